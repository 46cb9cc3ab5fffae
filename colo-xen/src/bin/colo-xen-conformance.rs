//! colo-xen-conformance: runs colo-core's backend conformance suite against a live Xen domain
//! from dom0, with `colo-xen-guest-agent` inside the guest doing the guest's writes.
//!
//! ```text
//! colo-xen-conformance --domid N --mailbox PFN
//! ```
//! `PFN` is what the agent printed (`AGENT MAILBOX <pfn>`). dom0 posts commands by writing the
//! mailbox page (pausing the domain for the write, as `write_pages` requires) and waits for the
//! agent's acknowledgement by reading it. The last line is `conformance: OK …` or
//! `conformance: FAIL …` (exit status 1).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use colo_core::conformance::{self, ConformanceGuest};
use colo_core::{Domain, PAGE_SIZE};
use colo_xen::XenDomain;

const MAGIC: u64 = u64::from_le_bytes(*b"COLOAGNT");
const CMD_FILL: u64 = 1;
const CMD_BG_ON: u64 = 2;
const CMD_BG_OFF: u64 = 3;

struct Agent {
    dom: XenDomain,
    mailbox: u64,
    scratch: Vec<u64>,
    seq: u64,
}

fn word(page: &[u8], idx: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&page[idx * 8..idx * 8 + 8]);
    u64::from_le_bytes(a)
}

fn set_word(page: &mut [u8], idx: usize, v: u64) {
    page[idx * 8..idx * 8 + 8].copy_from_slice(&v.to_le_bytes());
}

impl Agent {
    fn read_mailbox(&mut self) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        self.dom
            .read_pages(&[self.mailbox], &mut |_, page| {
                out.extend_from_slice(page.unwrap_or(&[]));
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        if out.len() != PAGE_SIZE {
            return Err(format!("mailbox pfn {:#x} does not map", self.mailbox));
        }
        Ok(out)
    }

    fn open(domid: u32, mailbox: u64) -> Result<Self, String> {
        let dom = XenDomain::open(domid).map_err(|e| e.to_string())?;
        let mut a = Agent {
            dom,
            mailbox,
            scratch: Vec::new(),
            seq: 0,
        };
        let mut page = a.read_mailbox().unwrap_or_default();
        if page.len() != PAGE_SIZE || word(&page, 0) != MAGIC || word(&page, 1) != mailbox {
            // The page moved since the agent printed it (or the console line was mangled):
            // look for the mailbox, which names its own pfn.
            a.mailbox = a.find_mailbox()?;
            println!(
                "conformance: agent mailbox found at pfn {:#x} (not {mailbox:#x})",
                a.mailbox
            );
            page = a.read_mailbox()?;
        }
        let n = word(&page, 2);
        if !(64..=64).contains(&n) {
            return Err(format!("agent offers {n} scratch pages, 64 expected"));
        }
        a.scratch = (0..n as usize).map(|i| word(&page, 3 + i)).collect();
        a.seq = word(&page, 384);
        if a.scratch.iter().any(|&p| p >= a.dom.page_count()) {
            return Err("agent reported a pfn beyond the domain".into());
        }
        Ok(a)
    }

    fn find_mailbox(&mut self) -> Result<u64, String> {
        let all: Vec<u64> = (0..self.dom.page_count()).collect();
        let mut found = None;
        self.dom
            .read_pages(&all, &mut |i, page| {
                if let Some(p) = page {
                    if found.is_none() && word(p, 0) == MAGIC && word(p, 1) == all[i] {
                        found = Some(all[i]);
                    }
                }
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        found.ok_or_else(|| "no agent mailbox in the guest's memory".to_string())
    }

    /// Posts a command; waits for the agent's acknowledgement if the domain runs.
    fn command(&mut self, cmd: u64, byte: u8, mask: u64) -> Result<(), String> {
        let was_paused = self.dom.is_paused();
        self.dom.pause().map_err(|e| e.to_string())?;
        let mut page = self.read_mailbox()?;
        self.seq += 1;
        set_word(&mut page, 257, cmd);
        set_word(&mut page, 258, u64::from(byte));
        set_word(&mut page, 259, mask);
        set_word(&mut page, 256, self.seq);
        self.dom
            .write_pages(&[self.mailbox], &page)
            .map_err(|e| e.to_string())?;
        if was_paused {
            return Ok(());
        }
        self.dom.resume().map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if word(&self.read_mailbox()?, 384) == self.seq {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the agent did not answer command {} in 60 s",
                    self.seq
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl ConformanceGuest for Agent {
    type Dom = XenDomain;

    fn domain(&mut self) -> &mut XenDomain {
        &mut self.dom
    }

    fn scratch_pfns(&self) -> Vec<u64> {
        let mut v = self.scratch.clone();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn exact(&self) -> bool {
        // A Linux guest writes its own pages (timers, the agent's stack) all the time.
        false
    }

    fn guest_write(&mut self, pfns: &[u64], pattern: u8) -> Result<(), String> {
        let mut mask = 0u64;
        for p in pfns {
            let i = self
                .scratch
                .iter()
                .position(|s| s == p)
                .ok_or_else(|| format!("pfn {p:#x} is not an agent scratch page"))?;
            mask |= 1 << i;
        }
        self.command(CMD_FILL, pattern, mask)
    }

    fn set_background_writes(&mut self, on: bool) -> Result<(), String> {
        self.command(if on { CMD_BG_ON } else { CMD_BG_OFF }, 0, 0)
    }

    fn let_time_pass(&mut self) {
        // Nested emulation is slow: give the guest a good slice.
        std::thread::sleep(Duration::from_millis(300));
    }

    fn state_difference(&self, a: &[u8], b: &[u8]) -> Option<String> {
        // Xen computes the guest's TSC and timer counts at every save, paused or not.
        colo_xen::state::clock_free_difference(a, b)
    }
}

/// One conformance check.
type Check = fn(&mut Agent) -> Result<(), conformance::ConformanceError>;

fn arg(args: &[String], key: &str) -> Result<u64, String> {
    let i = args
        .iter()
        .position(|a| a == key)
        .ok_or_else(|| format!("{key} is required"))?;
    let v = args
        .get(i + 1)
        .ok_or_else(|| format!("{key} needs a value"))?;
    v.parse()
        .map_err(|_| format!("{key}: `{v}` is not a number"))
}

fn run() -> Result<String, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let domid = u32::try_from(arg(&args, "--domid")?).map_err(|e| e.to_string())?;
    let mailbox = arg(&args, "--mailbox")?;
    let mut agent = Agent::open(domid, mailbox)?;
    // run_all wants a paused domain with logging off.
    agent.dom.pause().map_err(|e| e.to_string())?;
    agent.dom.stop_dirty_log().map_err(|e| e.to_string())?;
    let t = Instant::now();
    let checks: [(&str, Check); 7] = [
        ("pause_stops_writes", conformance::pause_stops_writes),
        ("every_write_reported", conformance::every_write_reported),
        (
            "nothing_twice_after_clear",
            conformance::nothing_twice_after_clear,
        ),
        ("read_after_write", conformance::read_after_write),
        ("harvest_peek_agree", conformance::harvest_peek_agree),
        ("state_round_trip", conformance::state_round_trip),
        ("rejects_bad_arguments", conformance::rejects_bad_arguments),
    ];
    agent.dom.start_dirty_log().map_err(|e| e.to_string())?;
    let mut failed = Vec::new();
    for (name, check) in checks {
        let c = Instant::now();
        match check(&mut agent) {
            Ok(()) => println!(
                "conformance: ok   {name} ({:.1} s)",
                c.elapsed().as_secs_f64()
            ),
            Err(e) => {
                println!("conformance: FAIL {name}: {e}");
                failed.push(name);
            }
        }
    }
    let _ = agent.dom.stop_dirty_log();
    let _ = agent.set_background_writes(false);
    agent.dom.resume().map_err(|e| e.to_string())?;
    if failed.is_empty() {
        Ok(format!(
            "7 checks passed in {:.1} s",
            t.elapsed().as_secs_f64()
        ))
    } else {
        Err(format!(
            "{} of 7 checks failed: {}",
            failed.len(),
            failed.join(", ")
        ))
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(s) => {
            println!("conformance: OK {s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("conformance: FAIL {e}");
            ExitCode::FAILURE
        }
    }
}
