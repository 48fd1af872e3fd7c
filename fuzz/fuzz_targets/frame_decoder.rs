//! Bytes a client writes on its socket, through the server's frame decoder and request parsing.
//! The body lives in `kvloft_engine::fuzzing`, where the stable smoke test runs it too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kvloft_engine::fuzzing::frame_decoder(data));
