//! Guest RAM: a memfd or a file under /dev/shm, mapped shared with memmap2, and the one handle
//! through which guest code, the host NIC and the tracker touch it.
//!
//! Guest RAM is written concurrently by vCPU threads, by the host (NIC DMA, checkpoint writes) and
//! by the kernel (`read(2)` into it), i.e. by agents outside Rust's aliasing model. Following
//! rust-vmm's practice, no Rust reference to guest RAM is ever formed while a writer may be active:
//! every access copies through raw pointers ([`GuestMem::read`], [`GuestMem::write`]) or uses an
//! atomic word ([`GuestMem::atomic_u64`]). The only borrowed view, [`GuestMem::slice_unchecked`],
//! is `unsafe` and used by [`crate::MockDomain`] only while every vCPU is parked.

use crate::MockError;
use colo_core::PAGE_SIZE;
use memmap2::{MmapOptions, MmapRaw};
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Shared mapping of guest RAM (it stays mapped until the last handle is dropped). Deliberately
/// not `Clone` outside this crate: code handed a `&GuestMem` (a vCPU job) cannot keep it.
pub struct GuestMem {
    _map: Arc<MmapRaw>,
    /// A second shared mapping of the same file, for the host's writes into a paused guest
    /// ([`GuestMem::write_host`]): the dirty tracker registers only the guest's mapping, so
    /// writes through this one take no write-protect fault and are not logged.
    _host_map: Arc<MmapRaw>,
    host_base: *mut u8,
    file: Arc<File>,
    base: *mut u8,
    len: usize,
}

impl std::fmt::Debug for GuestMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMem")
            .field("base", &self.base)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: `base` points into the shared mapping owned by `map` (kept alive by the Arc); every
// access through it is a raw-pointer copy or an atomic, never a Rust reference shared across
// threads, so moving or sharing the handle between threads is sound.
unsafe impl Send for GuestMem {}
// SAFETY: see `Send`; all methods take `&self` and only perform raw copies or atomic operations.
unsafe impl Sync for GuestMem {}

/// Opens the RAM backing: a fresh sparse file at `path`, else an anonymous memfd.
pub(crate) fn open_backing(path: Option<&Path>, bytes: u64) -> Result<File, MockError> {
    let file = match path {
        Some(p) => OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
            .map_err(|e| MockError::Os {
                op: "open guest RAM file",
                source: e,
            })?,
        None => crate::sys::memfd(c"colo-mock-ram").map_err(|e| MockError::Os {
            op: "memfd_create",
            source: e,
        })?,
    };
    file.set_len(bytes).map_err(|e| MockError::Os {
        op: "ftruncate guest RAM",
        source: e,
    })?;
    Ok(file)
}

impl GuestMem {
    /// Maps `file` (already sized) shared, read-write, without touching any page.
    pub(crate) fn map(file: File, bytes: usize) -> Result<Self, MockError> {
        let map = MmapOptions::new()
            .len(bytes)
            .map_raw(&file)
            .map_err(|e| MockError::Os {
                op: "mmap guest RAM",
                source: e,
            })?;
        let host_map = MmapOptions::new()
            .len(bytes)
            .map_raw(&file)
            .map_err(|e| MockError::Os {
                op: "mmap guest RAM (host view)",
                source: e,
            })?;
        let base = map.as_mut_ptr();
        let host_base = host_map.as_mut_ptr();
        for b in [base, host_base] {
            crate::sys::no_huge_pages(b, bytes).map_err(|e| MockError::Os {
                op: "madvise(MADV_NOHUGEPAGE)",
                source: e,
            })?;
        }
        Ok(Self {
            _map: Arc::new(map),
            _host_map: Arc::new(host_map),
            host_base,
            file: Arc::new(file),
            base,
            len: bytes,
        })
    }

    /// Another handle to the same mapping.
    pub(crate) fn share(&self) -> Self {
        Self {
            _map: Arc::clone(&self._map),
            _host_map: Arc::clone(&self._host_map),
            host_base: self.host_base,
            file: Arc::clone(&self.file),
            base: self.base,
            len: self.len,
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty RAM (never the case for a created domain).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size in pages.
    pub fn pages(&self) -> u64 {
        (self.len / PAGE_SIZE) as u64
    }

    /// Start address of the mapping (for the tracker's ioctls).
    pub(crate) fn addr(&self) -> u64 {
        self.base as u64
    }

    fn check(&self, off: usize, n: usize) -> Result<(), MockError> {
        match off.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(MockError::OutOfRange {
                offset: off as u64,
                len: n as u64,
                ram: self.len as u64,
            }),
        }
    }

    /// Copies guest RAM at `off` into `out`.
    pub fn read(&self, off: usize, out: &mut [u8]) -> Result<(), MockError> {
        self.check(off, out.len())?;
        // SAFETY: `off..off+out.len()` is inside the mapping (checked above), which stays mapped
        // while `self._map` lives; `out` is a distinct Rust buffer, so the ranges do not overlap.
        // Concurrent writers may tear the copy; callers that need a stable copy pause first.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(off), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `data` into guest RAM at `off`.
    pub fn write(&self, off: usize, data: &[u8]) -> Result<(), MockError> {
        self.check(off, data.len())?;
        // SAFETY: in bounds (checked), mapping alive while `self._map` lives, and `data` is a Rust
        // buffer that cannot alias guest RAM (no reference to guest RAM escapes while writers
        // may run; see the module docs).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(off), data.len()) };
        Ok(())
    }

    /// Copies `data` into guest RAM at `off` through the host's own mapping of the RAM file,
    /// not the guest's: no write-protect fault is taken, and a page the dirty tracker
    /// write-protected stays protected, so the write is not logged (the host writing a paused
    /// guest, as Xen's foreign mappings are not logged). A copy, no syscall; the first write
    /// to a page through this mapping takes one minor fault (its PTE), later ones none.
    ///
    /// The copy uses non-temporal stores where it can (x86-64, whole 64-byte lines): the
    /// paused guest does not read the page back soon, so the destination is not read into the
    /// cache first (a 10,000-page apply of scattered pages took about a quarter less time). Call
    /// [`GuestMem::host_writes_done`] after a batch of these writes, before the guest runs.
    pub(crate) fn write_host(&self, off: usize, data: &[u8]) -> Result<(), MockError> {
        self.check(off, data.len())?;
        // SAFETY: in bounds (checked; the host mapping has the guest mapping's length), the host
        // mapping is alive while `self._host_map` lives, and `data` is a Rust buffer that cannot
        // alias guest RAM (no reference to guest RAM escapes while writers may run).
        unsafe { stream_copy(self.host_base.add(off), data.as_ptr(), data.len()) };
        Ok(())
    }

    /// Orders the non-temporal stores of earlier [`GuestMem::write_host`] calls before any
    /// later store (the guest's resume): an `sfence` on x86-64, nothing elsewhere.
    pub(crate) fn host_writes_done(&self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `sfence` only orders stores; SSE is part of x86-64's baseline.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        };
    }

    /// Maps every page of the RAM file that holds data into the host's mapping now
    /// (`MADV_POPULATE_WRITE` over each data extent; holes stay holes), so later
    /// [`GuestMem::write_host`] calls take no page fault: a checkpoint's apply then costs a
    /// memcpy per page. Best effort: a kernel without it leaves the faults to the first
    /// writes.
    pub(crate) fn populate_host(&self) {
        let mut holes = Holes::default();
        let mut pfn = 0;
        while pfn < self.pages() {
            let hole = holes.is_hole(self, pfn);
            let (start, end) = (holes.start as usize, (holes.end as usize).min(self.len));
            if !hole && end > start {
                // SAFETY: `start..end` lies inside the host mapping (the extent is clamped to
                // the RAM's length); MADV_POPULATE_WRITE only faults those pages in, it reads
                // and writes no data.
                let r = unsafe {
                    libc::madvise(
                        self.host_base.add(start).cast(),
                        end - start,
                        libc::MADV_POPULATE_WRITE,
                    )
                };
                if r != 0 {
                    return;
                }
            }
            pfn = (end / PAGE_SIZE).max(pfn as usize + 1) as u64;
        }
    }

    /// Reads a little-endian u64 at `off` (guest data layout is little-endian).
    pub fn read_u64(&self, off: usize) -> Result<u64, MockError> {
        let mut b = [0u8; 8];
        self.read(off, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian u64 at `off`.
    pub fn write_u64(&self, off: usize, v: u64) -> Result<(), MockError> {
        self.write(off, &v.to_le_bytes())
    }

    /// The 8-aligned word at `off` as an atomic, for ring indices shared by host and guest.
    pub fn atomic_u64(&self, off: usize) -> Result<&AtomicU64, MockError> {
        self.check(off, 8)?;
        if off % 8 != 0 {
            return Err(MockError::OutOfRange {
                offset: off as u64,
                len: 8,
                ram: self.len as u64,
            });
        }
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned); the memory is live for
        // `&self`'s lifetime because `self._map` keeps the mapping. Every user of these words goes
        // through `AtomicU64`, and AtomicU64 has the same layout as u64.
        Ok(unsafe { &*(self.base.add(off) as *const AtomicU64) })
    }

    /// `read(2)` from `fd` straight into guest RAM at `off` — a write by the kernel, as a
    /// virtio device backend or DMA would do it. Returns the bytes read.
    pub fn read_from_fd(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        off: usize,
        len: usize,
    ) -> Result<usize, MockError> {
        use std::os::fd::AsRawFd;
        self.check(off, len)?;
        // SAFETY: `off..off+len` lies inside the live mapping (checked); the kernel writes at most
        // `len` bytes there. No Rust reference to that memory exists (module invariant).
        let r = unsafe { libc::read(fd.as_raw_fd(), self.base.add(off).cast(), len) };
        if r < 0 {
            return Err(MockError::Os {
                op: "read(2) into guest RAM",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(r as usize)
    }

    /// Borrows all of guest RAM.
    ///
    /// # Safety
    /// No one may write guest RAM while the slice lives: every vCPU is parked and no host path
    /// writes (the caller holds the domain exclusively or shared without any writer).
    pub(crate) unsafe fn slice_unchecked(&self) -> &[u8] {
        // SAFETY: the mapping is live and `len` bytes long; the caller guarantees no writer for
        // the slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.base, self.len) }
    }
}

/// A page of zeros: what a hole in the RAM file reads as.
pub(crate) static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Finds holes (never-written ranges) of the RAM file with `lseek(SEEK_DATA/SEEK_HOLE)`, caching
/// the last extent so ascending scans cost a few syscalls. Reading a shmem hole through the
/// mapping would allocate a page, so readers serve holes as [`ZERO_PAGE`] instead. While the
/// guest runs, a hole may be filled right after the check; that write is a tracked write, so a
/// reader that got zeros sees the page dirty again.
#[derive(Debug, Default)]
pub(crate) struct Holes {
    /// Cached extent `[start, end)` in bytes and whether it is a hole.
    start: u64,
    end: u64,
    hole: bool,
}

impl Holes {
    /// Forgets what may have changed since the last scan. Holes fill when the guest writes
    /// them, but data never turns back into a hole (nothing punches guest RAM), so a cached
    /// data extent stays valid and is kept: on a fully populated RAM file one `SEEK_HOLE` walk
    /// (about 15 ms per GiB on tmpfs) then serves every later scan.
    pub(crate) fn reset(&mut self) {
        if self.hole {
            *self = Self::default();
        }
    }

    /// Is page `pfn` a hole? On any lseek failure the page counts as data (always safe).
    pub(crate) fn is_hole(&mut self, mem: &GuestMem, pfn: u64) -> bool {
        use std::os::fd::AsRawFd;
        let off = pfn * PAGE_SIZE as u64;
        if off >= self.start && off < self.end {
            return self.hole;
        }
        let len = mem.len as u64;
        let fd = mem.file.as_raw_fd();
        let seek = |whence| {
            // SAFETY: lseek only moves this fd's file offset (nobody reads through that offset;
            // all IO on guest RAM goes through the mapping); no memory is passed.
            let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(r as u64)
            }
        };
        let (start, end, hole) = match seek(libc::SEEK_DATA) {
            Ok(d) if d > off => (off, d, true),
            Ok(_) => match seek(libc::SEEK_HOLE) {
                Ok(h) if h > off => (off, h, false),
                _ => (off, off + PAGE_SIZE as u64, false),
            },
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => (off, len, true),
            Err(_) => (off, off + PAGE_SIZE as u64, false),
        };
        // Round to whole pages: a partial-page extent means the page has data.
        let end_pg = if hole {
            end / PAGE_SIZE as u64 * PAGE_SIZE as u64
        } else {
            end.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64
        };
        if end_pg <= start {
            *self = Self {
                start,
                end: start + PAGE_SIZE as u64,
                hole: false,
            };
        } else {
            *self = Self {
                start,
                end: end_pg,
                hole,
            };
        }
        self.hole
    }
}

/// Copies `len` bytes from `src` to `dst` (non-overlapping): with non-temporal stores where
/// `dst` is 16-byte aligned and `len` whole 64-byte lines on x86-64 (a page always is), else
/// a plain copy. The caller issues [`GuestMem::host_writes_done`] after its batch.
///
/// # Safety
///
/// `src` must be valid for `len` bytes of reads, `dst` for `len` bytes of writes, and the two
/// ranges must not overlap.
unsafe fn stream_copy(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if (dst as usize) % 16 == 0 && len % 64 == 0 {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let mut i = 0;
        while i < len {
            // SAFETY: `i + 64 <= len` (len is a multiple of 64), so the four 16-byte loads and
            // stores are in the caller's ranges; `dst + i` is 16-byte aligned as the stream
            // store needs (dst is, and i is a multiple of 64); SSE2 is x86-64's baseline.
            unsafe {
                let s = src.add(i).cast::<__m128i>();
                let d = dst.add(i).cast::<__m128i>();
                let (a, b) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
                let (c, e) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
                _mm_stream_si128(d, a);
                _mm_stream_si128(d.add(1), b);
                _mm_stream_si128(d.add(2), c);
                _mm_stream_si128(d.add(3), e);
            }
            i += 64;
        }
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

#[cfg(test)]
mod tests {
    use super::stream_copy;

    /// Whole lines into an aligned destination stream, anything else is a plain copy; both
    /// copy exactly the bytes asked for, from an unaligned source too.
    #[test]
    fn stream_copy_copies_exactly_the_bytes_asked_for() {
        let src: Vec<u8> = (0..3 * 4096 + 7).map(|i| (i * 31 % 251) as u8).collect();
        #[repr(align(64))]
        struct Page([u8; 2 * 4096 + 128]);
        for (from, len, at) in [
            (0, 4096, 0),
            (7, 8192, 0),
            (3, 4096, 64),
            (1, 100, 0),
            (5, 64, 9),
        ] {
            let mut dst = Box::new(Page([0xee; 2 * 4096 + 128]));
            // SAFETY: `from + len` and `at + len` lie inside `src` and `dst`, which are
            // distinct allocations.
            unsafe { stream_copy(dst.0.as_mut_ptr().add(at), src.as_ptr().add(from), len) };
            fence();
            dst.0.iter().enumerate().for_each(|(i, &b)| {
                let want = if (at..at + len).contains(&i) {
                    src[from + i - at]
                } else {
                    0xee
                };
                assert_eq!(b, want, "byte {i} of a copy of {len} from {from} to {at}");
            });
        }
    }

    /// What `GuestMem::host_writes_done` issues.
    fn fence() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `sfence` only orders stores; SSE is part of x86-64's baseline.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        };
    }
}
