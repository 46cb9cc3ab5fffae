//! Fuzz target: the sealed link's opener fed arbitrary bytes as a stream of frames must never
//! panic nor accept a frame it did not see sealed; and a stream of frames sealed from the input,
//! with one byte changed at a position the input chooses, must deliver exactly the frames before
//! the change and refuse the rest.
#![no_main]

use colo_core::engine::messages::Role;
use colo_core::seal::{direction_key, Opener, Sealer, HEADER_LEN, OVERHEAD};
use libfuzzer_sys::fuzz_target;

fn opener() -> Opener {
    let key = direction_key(b"fuzz", &[1; 32], &[2; 32], Role::Primary).expect("key");
    Opener::with_rekey_after(key, 3000).expect("opener")
}

/// Opens `wire` frame by frame as the link's reader does; returns the plaintexts delivered and
/// whether the stream ended cleanly.
fn read(wire: &[u8]) -> (Vec<Vec<u8>>, bool) {
    let mut o = opener();
    let mut out = Vec::new();
    let mut rest = wire;
    while !rest.is_empty() {
        let Some(h) = rest.get(..HEADER_LEN) else {
            let _ = o.truncated(rest.len(), HEADER_LEN);
            return (out, false);
        };
        let Ok(want) = o.frame_len([h[0], h[1], h[2], h[3]]) else {
            return (out, false);
        };
        let Some(f) = rest.get(..want) else {
            let _ = o.truncated(rest.len(), want);
            return (out, false);
        };
        let mut f = f.to_vec();
        match o.open(&mut f) {
            Ok(r) => out.push(f[r].to_vec()),
            Err(_) => return (out, false),
        }
        rest = &rest[want..];
    }
    (out, true)
}

fuzz_target!(|data: &[u8]| {
    // Arbitrary bytes: nothing authenticates.
    let (got, _) = read(data);
    assert!(got.is_empty(), "a frame nobody sealed was accepted");

    // Frames sealed from the input (sizes from its first bytes), one byte changed.
    let Some((&sizes, rest)) = data.split_first() else {
        return;
    };
    let Some((&at, plain)) = rest.split_first() else {
        return;
    };
    let key = direction_key(b"fuzz", &[1; 32], &[2; 32], Role::Primary).expect("key");
    let mut s = Sealer::with_rekey_after(key, 3000).expect("sealer");
    let step = usize::from(sizes % 64) * 16 + 1;
    let frames: Vec<&[u8]> = plain.chunks(step).collect();
    let mut wire = Vec::new();
    let mut f = Vec::new();
    for p in &frames {
        Sealer::begin(&mut f);
        f.extend_from_slice(p);
        s.seal(&mut f).expect("seal");
        wire.extend_from_slice(&f);
    }
    let (got, clean) = read(&wire);
    assert!(clean);
    assert_eq!(got, frames.iter().map(|p| p.to_vec()).collect::<Vec<_>>());
    if wire.is_empty() {
        return;
    }
    let pos = usize::from(at) * wire.len() / 256;
    wire[pos] ^= 1 | at;
    let (got, clean) = read(&wire);
    assert!(!clean, "a change at byte {pos} went unnoticed");
    let mut start = 0;
    let mut changed = 0;
    for (k, p) in frames.iter().enumerate() {
        if pos < start + p.len() + OVERHEAD {
            changed = k;
            break;
        }
        start += p.len() + OVERHEAD;
    }
    assert_eq!(got.len(), changed);
});
