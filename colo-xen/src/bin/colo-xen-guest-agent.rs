//! colo-xen-guest-agent: runs *inside* a Linux guest so that dom0 can drive the guest's own
//! writes for colo-core's backend conformance suite (`colo-xen-conformance`).
//!
//! It locks 1 + 64 + 16 anonymous pages in memory and finds their guest pfns in
//! `/proc/self/pagemap` (needs root). Page 0 is a mailbox that dom0 reads and writes through
//! foreign mappings; the next 64 are the scratch pages dom0 may ask the guest to fill; the last
//! 16 are rewritten continuously while "background writes" are on. It prints
//! `AGENT MAILBOX <pfn>` on stdout (the guest console) and serves commands until killed.
//!
//! Mailbox layout, little-endian u64 words: `[0]` [`MAGIC`], `[1]` its own pfn, `[2]` scratch
//! count, `[3..67]` scratch pfns; `[256]` command sequence, `[257]` command (1 fill, 2
//! background on, 3 background off), `[258]` fill byte, `[259]` scratch-index mask (bit i =
//! scratch page i); `[384]` sequence of the last command done.
//!
//! It also serves a small key-value store over TCP on port 7777 (the network stage of
//! `cargo xtask xen-test` reaches it through colo's PV vif): one line per request, `PUT <key>
//! <value>` answered `OK <key>`, `GET <key>` answered `VAL <key> <value>` or `NONE <key>`,
//! anything else `ERR`. The store lives in this process's memory, so a checkpoint carries it
//! and a replica that took over answers what the primary acknowledged. Answers depend only on
//! the requests, so the primary's and the secondary's compare equal.
//!
//! When the guest has a disk ([`DISK`], the xvda colo serves with `--pv-vbd`; it may be plugged
//! after the agent started), every PUT is also written to it before it is answered: one 4 KiB
//! record per key (`colo_xen::kvdisk`), at the slot the key got on its first PUT, with
//! `O_DSYNC` (the write and a cache flush reach the disk before `pwrite` returns). A PUT the
//! disk refused is answered `ERR disk …`, never `OK`. `colo-xen-check disk` reads the records
//! back from the image file in dom0.

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

/// First word of the mailbox: "COLOAGNT".
pub const MAGIC: u64 = u64::from_le_bytes(*b"COLOAGNT");
const PAGE: usize = 4096;
const SCRATCH: usize = 64;
const BACKGROUND: usize = 16;

fn word(region: *mut u8, page: usize, idx: usize) -> *mut u64 {
    // Pointer arithmetic only; callers stay inside the region (page < 81, idx < 512).
    region.wrapping_add(page * PAGE + idx * 8).cast::<u64>()
}

fn read(region: *mut u8, idx: usize) -> u64 {
    // SAFETY: `region` is the agent's own mapping of 81 pages, alive for the whole process;
    // idx < 512 keeps the 8-byte read inside page 0, which is 8-byte aligned; volatile because
    // dom0 writes the mailbox behind the compiler's back.
    unsafe { std::ptr::read_volatile(word(region, 0, idx)) }
}

fn write(region: *mut u8, idx: usize, v: u64) {
    // SAFETY: as in `read`.
    unsafe { std::ptr::write_volatile(word(region, 0, idx), v) }
}

fn fill_page(region: *mut u8, page: usize, byte: u8) {
    // SAFETY: page < 81, so the 4096 bytes lie inside the agent's own mapping.
    unsafe { std::ptr::write_bytes(region.wrapping_add(page * PAGE), byte, PAGE) }
}

fn pfn_of(pagemap: &mut std::fs::File, addr: usize) -> std::io::Result<u64> {
    let mut e = [0u8; 8];
    pagemap.seek(SeekFrom::Start((addr / PAGE) as u64 * 8))?;
    pagemap.read_exact(&mut e)?;
    let v = u64::from_le_bytes(e);
    if v >> 63 == 0 || v & ((1 << 55) - 1) == 0 {
        return Err(std::io::Error::other(format!(
            "page at {addr:#x} not present or pfn hidden (run as root)"
        )));
    }
    Ok(v & ((1 << 55) - 1))
}

/// The key-value service's port.
const KV_PORT: u16 = 7777;

/// The guest's disk, when colo serves one (`--pv-vbd`).
const DISK: &str = "/dev/xvda";

/// The store: values, each key's disk slot and PUT count, and the disk once it is there.
struct Kv {
    values: std::collections::HashMap<String, String>,
    slots: std::collections::HashMap<String, (u64, u64)>,
    next_slot: u64,
    path: &'static str,
    disk: Option<(std::fs::File, u64)>,
}

impl Kv {
    fn new(path: &'static str) -> Self {
        Self {
            values: Default::default(),
            slots: Default::default(),
            next_slot: 0,
            path,
            disk: None,
        }
    }

    /// Opens the disk if it appeared (O_DSYNC); its size in slots beside it.
    fn disk(&mut self) -> Option<&(std::fs::File, u64)> {
        use std::os::unix::fs::OpenOptionsExt;
        if self.disk.is_none() {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DSYNC)
                .open(self.path)
                .ok()?;
            let bytes = f.seek(SeekFrom::End(0)).ok()?;
            println!("AGENT KV persisting to {} ({} MiB)", self.path, bytes >> 20);
            self.disk = Some((f, bytes / colo_xen::kvdisk::SLOT as u64));
        }
        self.disk.as_ref()
    }

    /// Stores `k` = `v`, on the disk first (durably) when there is one.
    fn put(&mut self, k: &str, v: &str) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let (slot, version) = match self.slots.get(k) {
            Some(&(s, n)) => (s, n + 1),
            None => (self.next_slot, 1),
        };
        if let Some((f, slots)) = self.disk() {
            if slot >= *slots {
                return Err(format!("disk full ({slots} slots)"));
            }
            let rec = colo_xen::kvdisk::encode(&colo_xen::kvdisk::Record {
                slot,
                version,
                key: k.into(),
                value: v.into(),
            })
            .ok_or("key and value too long for a record")?;
            f.write_all_at(&rec, slot * colo_xen::kvdisk::SLOT as u64)
                .map_err(|e| format!("writing the disk: {e}"))?;
        }
        if version == 1 {
            self.next_slot += 1;
        }
        self.slots.insert(k.into(), (slot, version));
        self.values.insert(k.into(), v.into());
        Ok(())
    }
}

/// Serves one connection of the key-value store until it closes.
fn kv_session(stream: std::net::TcpStream, store: &std::sync::Mutex<Kv>) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut out = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let mut w = line.splitn(3, ' ');
        let answer = match (w.next(), w.next(), w.next()) {
            (Some("PUT"), Some(k), Some(v)) => {
                // The lock is held across the disk write: PUTs reach the disk in the order
                // they are answered.
                match store.lock().unwrap_or_else(|e| e.into_inner()).put(k, v) {
                    Ok(()) => format!("OK {k}\n"),
                    Err(e) => format!("ERR disk {e}\n"),
                }
            }
            (Some("GET"), Some(k), None) => {
                match store
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values
                    .get(k)
                {
                    Some(v) => format!("VAL {k} {v}\n"),
                    None => format!("NONE {k}\n"),
                }
            }
            _ => "ERR\n".to_string(),
        };
        out.write_all(answer.as_bytes())?;
    }
    Ok(())
}

/// The key-value store on [`KV_PORT`], a thread per connection.
fn kv_server() {
    let store = std::sync::Arc::new(std::sync::Mutex::new(Kv::new(DISK)));
    let listener = match std::net::TcpListener::bind(("0.0.0.0", KV_PORT)) {
        Ok(l) => l,
        Err(e) => {
            println!("AGENT KV not serving: {e}");
            return;
        }
    };
    println!("AGENT KV serving on port {KV_PORT}");
    for stream in listener.incoming().flatten() {
        let store = store.clone();
        std::thread::spawn(move || {
            let _ = kv_session(stream, &store);
        });
    }
}

fn main() -> std::io::Result<()> {
    std::thread::spawn(kv_server);
    let pages = 1 + SCRATCH + BACKGROUND;
    // SAFETY: a fresh private anonymous mapping; the result is checked against MAP_FAILED.
    let region = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if region == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let region = region.cast::<u8>();
    // SAFETY: locks the mapping made above, so its pages stay resident at fixed frames.
    if unsafe { libc::mlock(region.cast(), pages * PAGE) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for p in 0..pages {
        fill_page(region, p, 0);
    }
    let mut pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let base = region as usize;
    write(region, 0, MAGIC);
    write(region, 1, pfn_of(&mut pagemap, base)?);
    write(region, 2, SCRATCH as u64);
    for i in 0..SCRATCH {
        write(region, 3 + i, pfn_of(&mut pagemap, base + (1 + i) * PAGE)?);
    }
    println!("AGENT MAILBOX {}", read(region, 1));
    let mut done = 0u64;
    let mut background = false;
    let mut tick = 0u8;
    loop {
        let seq = read(region, 256);
        if seq != done {
            match read(region, 257) {
                1 => {
                    let byte = read(region, 258) as u8;
                    let mask = read(region, 259);
                    for i in 0..SCRATCH {
                        if mask >> i & 1 == 1 {
                            fill_page(region, 1 + i, byte);
                        }
                    }
                }
                2 => background = true,
                3 => background = false,
                _ => {}
            }
            done = seq;
            write(region, 384, seq);
        }
        if background {
            tick = tick.wrapping_add(1);
            for i in 0..BACKGROUND {
                fill_page(region, 1 + SCRATCH + i, tick);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colo_xen::kvdisk::{decode, Record, Slot, SLOT};

    #[test]
    fn puts_reach_the_disk_one_slot_per_key_before_they_are_answered() {
        let path = std::env::temp_dir().join(format!("colo-agent-kv-{}", std::process::id()));
        let leaked: &'static str = Box::leak(path.to_str().unwrap().to_string().into_boxed_str());
        let mut kv = Kv::new(leaked);
        // No disk yet: the PUT is kept in memory only.
        kv.put("early", "1").unwrap();
        std::fs::File::create(&path)
            .unwrap()
            .set_len(3 * SLOT as u64)
            .unwrap();
        kv.put("a", "x").unwrap();
        kv.put("b", "y").unwrap();
        kv.put("a", "z").unwrap();
        let img = std::fs::read(&path).unwrap();
        let slot = |i: usize| decode(i as u64, &img[i * SLOT..(i + 1) * SLOT]);
        assert_eq!(
            slot(0),
            Slot::Empty,
            "the key put before the disk came keeps its slot"
        );
        let rec = |slot, version, key: &str, value: &str| {
            Slot::Record(Record {
                slot,
                version,
                key: key.into(),
                value: value.into(),
            })
        };
        assert_eq!(slot(1), rec(1, 2, "a", "z"));
        assert_eq!(slot(2), rec(2, 1, "b", "y"));
        let e = kv.put("c", "w").unwrap_err();
        assert!(e.contains("disk full"), "{e}");
        assert_eq!(
            kv.values.get("c"),
            None,
            "a PUT the disk refused is not stored"
        );
        let _ = std::fs::remove_file(&path);
    }
}
