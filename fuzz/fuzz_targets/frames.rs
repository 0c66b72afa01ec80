//! Host↔guest frames: the decoder, then every message parser, on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_protocol::exec::{ExecRequest, GuestMessage, HostMessage};
use matchlock_protocol::frame::read_frame;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    while let Ok(Some(frame)) = read_frame(&mut stream) {
        let _ = ExecRequest::from_frame(&frame);
        let _ = HostMessage::from_frame(frame.clone());
        let _ = GuestMessage::from_frame(frame);
    }
});
