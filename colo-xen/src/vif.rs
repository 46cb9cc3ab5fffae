//! Raw Ethernet frames on a named Linux interface (an AF_PACKET port): a Xen guest's vif in
//! dom0 (`vif7.0`), a tap or veth port on the service bridge, or a NIC. Needs no Xen: the tests
//! run it on veth pairs.
//!
//! One [`PacketPort`] is one `socket(AF_PACKET, SOCK_RAW)` bound to the interface's index, with
//! `PACKET_IGNORE_OUTGOING` (a port does not read back what it sent; frames tagged
//! `PACKET_OUTGOING` are skipped as well on kernels older than 4.20), the interface in
//! promiscuous mode for as long as the socket lives (`PACKET_ADD_MEMBERSHIP` /
//! `PACKET_MR_PROMISC`: a NIC must hand over frames for the guest's MAC, not only its own), and
//! nonblocking: [`PacketPort::send`] answers `Ok(false)` when the interface's queue is full,
//! [`PacketPort::recv`] `Ok(None)` when nothing waits. [`PacketPort::signal`] starts a thread
//! that waits on the socket (`poll`) and fires a crossbeam channel, so the node loop sleeps until
//! a frame arrives together with its other event sources.
//!
//! A plain socket, not a TPACKET_V3 ring: the bench (`cargo xtask bench`, "vif") measures
//! frames/s through a port pair; a ring saves a copy and a syscall per frame, which pays above
//! the rates a checkpointed guest reaches (every released frame waits for a checkpoint or the
//! SVM's twin anyway).
//!
//! Checksum offload: a guest (netfront, or a veth peer) hands dom0 frames whose TCP/UDP checksum
//! is left for the NIC to fill (CHECKSUM_PARTIAL); read raw, they would leave colo with a wrong
//! checksum and be dropped by the receiver. The port therefore reads with `PACKET_VNET_HDR`:
//! each frame comes with a virtio-net header, and a frame marked NEEDS_CSUM gets its checksum
//! completed by [`PacketPort::recv`] (the field holds the pseudo-header sum; the one's-complement
//! sum from `csum_start` to the end finishes it). Sends carry an empty header.
//!
//! Segmentation offloads: a guest with TSO/GSO hands dom0 frames larger than the MTU; colo forwards frames as
//! they are, and a port's `send` of a frame above the other side's MTU fails (EMSGSIZE, reported
//! as [`VifError::TooBig`]). Operators turn segmentation offloads off on the vif and the service
//! port (`ethtool -K vif7.0 tso off gso off gro off`; see docs/operations.md).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The largest frame a port reads (a 64 KiB GSO frame and its Ethernet header).
pub const MAX_PORT_FRAME: usize = 65_536 + 14;

/// Errors of an AF_PACKET port, each naming the interface.
#[derive(Debug, thiserror::Error)]
pub enum VifError {
    /// No interface of that name in this network namespace.
    #[error("no network interface `{name}` (see `ip link`; a Xen vif is vifDOMID.N in dom0)")]
    NoInterface {
        /// The name asked for.
        name: String,
    },
    /// The name cannot be an interface name.
    #[error("`{name}` is not a valid interface name (1 to 15 bytes, no NUL)")]
    BadName {
        /// The name given.
        name: String,
    },
    /// A socket call on the port failed.
    #[error("{op} on interface `{name}` failed")]
    Os {
        /// The call (`socket`, `bind`, `sendto`, …).
        op: &'static str,
        /// The interface.
        name: String,
        /// The errno behind it.
        #[source]
        source: io::Error,
    },
    /// The interface is down.
    #[error("interface `{name}` is down (`ip link set {name} up`)")]
    Down {
        /// The interface.
        name: String,
    },
    /// A frame larger than the interface takes (turn segmentation offloads off).
    #[error(
        "a {len}-byte frame does not fit interface `{name}` (EMSGSIZE; turn offloads off: \
         `ethtool -K {name} tso off gso off gro off`)"
    )]
    TooBig {
        /// The interface.
        name: String,
        /// The frame's length.
        len: usize,
    },
}

impl From<VifError> for colo_core::BackendError {
    fn from(e: VifError) -> Self {
        match e {
            VifError::Os { op, source, .. } => colo_core::BackendError::Os { op, source },
            other => colo_core::BackendError::BadState {
                op: "vif",
                reason: other.to_string(),
            },
        }
    }
}

/// A crossbeam receiver that holds a message whenever the port has frames to read (a bounded
/// channel of one), fed by a thread that lives as long as this value.
#[derive(Debug)]
pub struct PortSignal {
    rx: crossbeam_channel::Receiver<()>,
    stop: Arc<AtomicBool>,
}

impl PortSignal {
    /// The channel to wait on.
    pub fn receiver(&self) -> &crossbeam_channel::Receiver<()> {
        &self.rx
    }
}

impl Drop for PortSignal {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One AF_PACKET socket on one interface (see the module docs).
#[derive(Debug)]
pub struct PacketPort {
    fd: Arc<OwnedFd>,
    name: String,
}

fn os(op: &'static str, name: &str) -> VifError {
    VifError::Os {
        op,
        name: name.to_string(),
        source: io::Error::last_os_error(),
    }
}

/// `size_of::<T>()` as a socklen_t.
fn socklen<T>() -> libc::socklen_t {
    std::mem::size_of::<T>() as libc::socklen_t
}

impl PacketPort {
    /// Opens a port on interface `name` (see the module docs). Needs CAP_NET_RAW.
    pub fn open(name: &str) -> Result<Self, VifError> {
        let bad = || VifError::BadName {
            name: name.to_string(),
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(bad());
        }
        let cname = CString::new(name).map_err(|_| bad())?;
        // SAFETY: cname is a valid NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(VifError::NoInterface {
                name: name.to_string(),
            });
        }
        let ifindex = ifindex as i32;
        // Protocol 0 first: the socket receives nothing until it is bound to the interface
        // (with ETH_P_ALL it would queue every interface's frames in between).
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(os("socket(AF_PACKET)", name));
        }
        // SAFETY: raw is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let port = Self {
            fd: Arc::new(fd),
            name: name.to_string(),
        };
        port.setsockopt(libc::PACKET_VNET_HDR, &1i32, "PACKET_VNET_HDR")?;
        port.setsockopt(
            libc::PACKET_IGNORE_OUTGOING,
            &1i32,
            "PACKET_IGNORE_OUTGOING",
        )
        .or_else(|e| match &e {
            // Before Linux 4.20: recv skips PACKET_OUTGOING frames itself.
            VifError::Os { source, .. } if source.raw_os_error() == Some(libc::ENOPROTOOPT) => {
                Ok(())
            }
            _ => Err(e),
        })?;
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: sll is a valid sockaddr_ll and the length given is its size.
        let rc = unsafe {
            libc::bind(
                port.raw(),
                (&sll as *const libc::sockaddr_ll).cast(),
                socklen::<libc::sockaddr_ll>(),
            )
        };
        if rc != 0 {
            return Err(os("bind", name));
        }
        // SAFETY: packet_mreq is plain old data; all-zero is a valid value.
        let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
        mreq.mr_ifindex = ifindex;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        port.setsockopt(libc::PACKET_ADD_MEMBERSHIP, &mreq, "PACKET_MR_PROMISC")?;
        if !port.is_up()? {
            return Err(VifError::Down {
                name: name.to_string(),
            });
        }
        Ok(port)
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn setsockopt<T>(&self, opt: libc::c_int, val: &T, what: &'static str) -> Result<(), VifError> {
        // SAFETY: val points to a live T and the length given is its size.
        let rc = unsafe {
            libc::setsockopt(
                self.raw(),
                libc::SOL_PACKET,
                opt,
                (val as *const T).cast(),
                socklen::<T>(),
            )
        };
        if rc != 0 {
            return Err(os(what, &self.name));
        }
        Ok(())
    }

    /// Whether the interface is up (SIOCGIFFLAGS).
    fn is_up(&self) -> Result<bool, VifError> {
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(self.name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: ifr is a valid ifreq with a NUL-terminated name (the name is shorter than
        // IFNAMSIZ and the rest is zero); SIOCGIFFLAGS writes only into it.
        let rc = unsafe { libc::ioctl(self.raw(), libc::SIOCGIFFLAGS, &mut ifr) };
        if rc != 0 {
            return Err(os("SIOCGIFFLAGS", &self.name));
        }
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        Ok(flags & libc::IFF_UP as libc::c_short != 0)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends one Ethernet frame out of the interface. `Ok(false)`: the interface's queue is
    /// full (try again later); nothing was sent.
    pub fn send(&self, frame: &[u8]) -> Result<bool, VifError> {
        let mut hdr = [0u8; VNET_HDR];
        let iov = [
            libc::iovec {
                iov_base: hdr.as_mut_ptr().cast(),
                iov_len: VNET_HDR,
            },
            libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            },
        ];
        // SAFETY: msghdr is plain old data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len();
        // SAFETY: msg points to two live iovecs (an empty virtio-net header and the frame),
        // which sendmsg only reads; the socket is bound, so no address is needed.
        let n = unsafe { libc::sendmsg(self.raw(), &msg, libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::ENOBUFS) => Ok(false),
            Some(libc::EMSGSIZE) => Err(VifError::TooBig {
                name: self.name.clone(),
                len: frame.len(),
            }),
            Some(libc::ENETDOWN) => Err(VifError::Down {
                name: self.name.clone(),
            }),
            _ => Err(VifError::Os {
                op: "send",
                name: self.name.clone(),
                source: err,
            }),
        }
    }

    /// Reads the next frame into `buf` (at least [`MAX_PORT_FRAME`] bytes keeps every frame
    /// whole). `Ok(None)`: nothing waits. A frame longer than `buf` is an error naming its
    /// length (it was consumed).
    pub fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, VifError> {
        loop {
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut hdr = [0u8; VNET_HDR];
            let iov = [
                libc::iovec {
                    iov_base: hdr.as_mut_ptr().cast(),
                    iov_len: VNET_HDR,
                },
                libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                },
            ];
            // SAFETY: msghdr is plain old data; all-zero is a valid value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_ptr().cast_mut();
            msg.msg_iovlen = iov.len();
            msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
            msg.msg_namelen = socklen::<libc::sockaddr_ll>();
            // SAFETY: msg points to two live, writable buffers (the header and buf) and to a
            // writable sockaddr_ll, all of the lengths given. MSG_TRUNC makes the call return
            // the packet's real length.
            let n = unsafe {
                libc::recvmsg(self.raw(), &mut msg, libc::MSG_DONTWAIT | libc::MSG_TRUNC)
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(None),
                    Some(libc::EINTR) => continue,
                    _ => Err(VifError::Os {
                        op: "recvfrom",
                        name: self.name.clone(),
                        source: err,
                    }),
                };
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let n = (n as usize).saturating_sub(VNET_HDR);
            if n > buf.len() {
                return Err(VifError::TooBig {
                    name: self.name.clone(),
                    len: n,
                });
            }
            complete_checksum(&hdr, &mut buf[..n]);
            return Ok(Some(n));
        }
    }

    /// Waits until a frame can be read or `timeout` passed; true if one can.
    pub fn wait(&self, timeout: Duration) -> Result<bool, VifError> {
        poll_in(self.raw(), timeout).map_err(|source| VifError::Os {
            op: "poll",
            name: self.name.clone(),
            source,
        })
    }

    /// Starts the thread behind a [`PortSignal`] for this port.
    pub fn signal(&self) -> Result<PortSignal, VifError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let stop = Arc::new(AtomicBool::new(false));
        let (fd, stop2) = (self.fd.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("colo-port-{}", self.name))
            .spawn(move || signal_loop(&fd, &tx, &stop2))
            .map_err(|source| VifError::Os {
                op: "spawning the port's signal thread",
                name: self.name.clone(),
                source,
            })?;
        Ok(PortSignal { rx, stop })
    }
}

/// The virtio-net header's size (`struct virtio_net_hdr`, without the mergeable-buffers count).
const VNET_HDR: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const NEEDS_CSUM: u8 = 1;

/// Finishes the transport checksum of `frame` if its virtio-net header `hdr` says the sender
/// left it to the NIC (flags NEEDS_CSUM; csum_start and csum_offset little-endian, as the host
/// is). Offsets outside the frame leave it as it is.
pub fn complete_checksum(hdr: &[u8; VNET_HDR], frame: &mut [u8]) {
    if hdr[0] & NEEDS_CSUM == 0 {
        return;
    }
    let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
    let field = start + usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
    finish_l4_checksum(frame, start, field);
}

/// Completes a transport checksum left to the NIC: the field at `field` holds the
/// pseudo-header sum, and the one's-complement sum from `start` to the frame's end finishes it
/// (both offsets from the frame's start). Offsets outside the frame leave it as it is.
pub(crate) fn finish_l4_checksum(frame: &mut [u8], start: usize, field: usize) {
    if field + 2 > frame.len() || start >= frame.len() {
        return;
    }
    let mut sum: u32 = 0;
    for c in frame[start..].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut c = !(sum as u16);
    // A UDP checksum of 0 means "none"; its one's-complement twin is sent instead (RFC 768).
    if c == 0 {
        c = 0xffff;
    }
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
}

/// How often the signal thread looks at its stop flag.
const SIGNAL_TICK: Duration = Duration::from_millis(100);

fn signal_loop(fd: &OwnedFd, tx: &crossbeam_channel::Sender<()>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match poll_in(fd.as_raw_fd(), SIGNAL_TICK) {
            Ok(true) => {
                // Frames wait: one message (the channel holds at most one), then wait until the
                // node took it, so unread frames cost at most one wake-up per tick.
                while !stop.load(Ordering::Relaxed) {
                    match tx.send_timeout((), SIGNAL_TICK) {
                        Ok(()) => break,
                        Err(crossbeam_channel::SendTimeoutError::Timeout(())) => {}
                        Err(crossbeam_channel::SendTimeoutError::Disconnected(())) => return,
                    }
                }
                // Give the node the time to read what is there before looking again.
                std::thread::yield_now();
                if tx.is_full() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Ok(false) => {}
            Err(_) => return,
        }
    }
}

/// poll(2) for POLLIN on `fd` for at most `timeout`.
fn poll_in(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: pfd is one valid pollfd and the count says one.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    match rc {
        0 => Ok(false),
        n if n > 0 => Ok(pfd.revents & libc::POLLIN != 0),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// Moves the calling thread into the network namespace at `path` (e.g. `/run/netns/NAME`, as
/// `ip netns add` creates it). Only this thread changes namespace; sockets it opens afterwards
/// live there. For tests and benches that play a guest, a client or a service network in a
/// namespace of their own.
pub fn enter_netns(path: &std::path::Path) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: f is an open namespace file; CLONE_NEWNET restricts setns to a network namespace,
    // which a thread of a multithreaded process may switch alone.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
