//! Fuzz target: colo-core's `Neighbours::learn`, which reads the addresses a survivor will
//! announce from the guest's own frames: any bytes must never panic, at most one address is
//! learnt per frame, and every announcement built from what was learnt is a well-formed frame
//! (60 bytes for a gratuitous ARP, 86 for an unsolicited NA) from a unicast MAC.
#![no_main]

use colo_core::announce::Neighbours;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let mut n = Neighbours::default();
    for frame in input.split(|&b| b == 0xa5).take(64) {
        let before = n.ipv4().len() + n.ipv6().len();
        n.learn(frame);
        assert!(n.ipv4().len() + n.ipv6().len() <= before + 1);
    }
    for f in n.announcements() {
        assert!(f.len() == 60 || f.len() == 86, "announcement of {} bytes", f.len());
        assert_eq!(f[6] & 1, 0, "a multicast source MAC");
    }
});
