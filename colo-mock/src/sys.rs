//! Raw Linux interfaces for dirty tracking: userfaultfd write-protect (async mode) and the
//! `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap`.
//!
//! libc 0.2 has neither `PAGEMAP_SCAN` nor `UFFD_FEATURE_WP_ASYNC`, so the uapi structs are
//! written out here (`include/uapi/linux/userfaultfd.h`, `include/uapi/linux/fs.h`) with
//! compile-time size checks. Every function returns the errno as an [`std::io::Error`].

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `userfaultfd(2)` flag: only faults from user mode; needs no privilege.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: u64 = 0xC018_AA3F;
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
const UFFDIO_UNREGISTER: u64 = 0x8010_AA01;
const UFFDIO_WRITEPROTECT: u64 = 0xC018_AA06;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

/// Write-protect shmem and hugetlbfs mappings.
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Write-protect never-populated page table entries too.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// The kernel resolves write-protect faults itself and records them as "written".
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = (3 << 30) | (96 << 16) | ((b'f' as u64) << 8) | 16;
/// Write-protect the pages that match while walking.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail unless the range is registered for async write-protect.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// Category: the page was written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct page_region`: one run of pages `[start, end)` (virtual addresses) and its categories.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PageRegion {
    /// First byte of the run.
    pub start: u64,
    /// One past the last byte of the run.
    pub end: u64,
    /// The run's `PAGE_IS_*` categories (masked by `return_mask`).
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct PmScanArg {
    /// Size of this struct (96).
    pub size: u64,
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// First address to walk.
    pub start: u64,
    /// One past the last address to walk.
    pub end: u64,
    /// Set by the kernel: where the walk stopped.
    pub walk_end: u64,
    /// Output vector of [`PageRegion`].
    pub vec: u64,
    /// Capacity of `vec` in regions.
    pub vec_len: u64,
    /// Stop after this many pages (0 = no limit).
    pub max_pages: u64,
    /// Categories to invert before matching.
    pub category_inverted: u64,
    /// Categories that must all be present.
    pub category_mask: u64,
    /// Categories of which at least one must be present.
    pub category_anyof_mask: u64,
    /// Categories to report.
    pub return_mask: u64,
}

const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 16);

fn ioctl_ptr<T>(fd: RawFd, req: u64, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: `arg` is a live, exclusively borrowed `#[repr(C)]` struct whose layout matches
    // what the kernel expects for `req` (sizes are asserted above); the kernel reads and writes
    // only within it for the duration of the call.
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens a userfaultfd (close-on-exec, non-blocking, user-mode faults only).
pub fn userfaultfd() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
    // SAFETY: userfaultfd(2) takes one integer argument and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(r).map_err(|_| io::Error::other("userfaultfd returned a bad fd"))?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `UFFDIO_API` handshake asking for `features`; returns the features granted.
pub fn uffd_api(fd: &OwnedFd, features: u64) -> io::Result<u64> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl_ptr(fd.as_raw_fd(), UFFDIO_API, &mut a)?;
    Ok(a.features)
}

/// Registers `[start, start+len)` for write-protect tracking.
pub fn uffd_register_wp(fd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    ioctl_ptr(fd.as_raw_fd(), UFFDIO_REGISTER, &mut r).map(drop)
}

/// Unregisters `[start, start+len)`.
pub fn uffd_unregister(fd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start, len };
    ioctl_ptr(fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut r).map(drop)
}

/// Write-protects (`protect`) or unprotects `[start, start+len)`. In async mode an unprotected
/// page reads as written, a protected one as clean.
pub fn uffd_writeprotect(fd: &OwnedFd, start: u64, len: u64, protect: bool) -> io::Result<()> {
    let mut w = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    ioctl_ptr(fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut w).map(drop)
}

/// One `PAGEMAP_SCAN` call. `arg.vec`/`arg.vec_len` are set from `regions` (or cleared when it is
/// empty); returns the number of regions the kernel filled in.
pub fn pagemap_scan(
    pagemap: &File,
    arg: &mut PmScanArg,
    regions: &mut [PageRegion],
) -> io::Result<usize> {
    arg.size = std::mem::size_of::<PmScanArg>() as u64;
    if regions.is_empty() {
        arg.vec = 0;
        arg.vec_len = 0;
    } else {
        arg.vec = regions.as_mut_ptr() as u64;
        arg.vec_len = regions.len() as u64;
    }
    // The kernel writes at most `vec_len` regions into `regions`, which stays borrowed
    // exclusively for the call through `regions`.
    let n = ioctl_ptr(pagemap.as_raw_fd(), PAGEMAP_SCAN, arg)?;
    let n = usize::try_from(n).unwrap_or(0);
    Ok(n.min(regions.len()))
}

/// `madvise(MADV_NOHUGEPAGE)` so shmem is tracked exactly at 4 KiB.
pub fn no_huge_pages(ptr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: madvise only changes the kernel's paging policy for the range; `ptr..ptr+len` is
    // a mapping the caller owns. No memory is read or written through it.
    let r = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_NOHUGEPAGE) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `memfd_create(name, MFD_CLOEXEC)`.
pub fn memfd(name: &std::ffi::CStr) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let r = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `r` is a fresh fd owned by nobody else.
    Ok(unsafe { File::from_raw_fd(r) })
}
