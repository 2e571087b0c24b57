//! The agent channel as each side reads it: arbitrary bytes, cut into chunks of a size
//! the input chooses, through the line splitter and the decoder. Nothing may panic, no
//! line handed on may exceed the bound, and whatever decodes means one thing (encoding
//! it again decodes to the same message).
#![no_main]

use hearth::guest::protocol::{
    GuestMessage, HostMessage, LineSplitter, MAX_GUEST_LINE, Message, decode_line, encode_line,
};
use libfuzzer_sys::fuzz_target;

fn read_all<T: Message + PartialEq + std::fmt::Debug>(stream: &[u8], chunk: usize) {
    let mut lines = LineSplitter::for_messages::<T>();
    for piece in stream.chunks(chunk) {
        lines.push(piece);
        while let Some(line) = lines.next_line() {
            let Ok(line) = line else { continue };
            assert!(
                line.len() <= MAX_GUEST_LINE,
                "a line of {} bytes",
                line.len()
            );
            if let Ok(msg) = decode_line::<T>(&line) {
                let again = encode_line(&msg);
                assert_eq!(decode_line::<T>(&again).ok().as_ref(), Some(&msg));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    // The host reads what a guest sends; the guest reads what the host sends.
    read_all::<GuestMessage>(stream, chunk);
    read_all::<HostMessage>(stream, chunk);
});
