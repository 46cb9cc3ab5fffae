//! Fuzz target: the kv service's TCP decoders in colo-mock (`parse_tcp`, the stream's
//! `next_stream_message`, and `TcpClientConn::receive`, which the tests' client feeds the
//! guest's frames): any bytes must never panic, a stream message never claims more bytes than
//! it was given, and a client's received stream only ever grows by what a frame carried.
#![no_main]

use colo_mock::tcp::TcpClientConn;
use colo_mock::{next_stream_message, parse_tcp, ClientAddr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let _ = parse_tcp(input);
    if let Ok(Some((m, used))) = next_stream_message(input) {
        assert!(used <= input.len() && m.len() + 2 == used);
    }
    let me = ClientAddr {
        mac: [2, 0, 0, 0, 0, 1],
        ip: [10, 0, 0, 1],
        port: 40000,
    };
    let mut out = Vec::new();
    let Ok(mut c) = TcpClientConn::open(me, 7, &mut out) else {
        return;
    };
    for frame in input.split(|&b| b == 0xa5).take(64) {
        let _ = c.receive(frame);
        while let Ok(Some(_)) = c.next_response() {}
    }
});
