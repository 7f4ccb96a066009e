#![no_main]
//! The TURN core driven by arbitrary sequences of client and peer datagrams.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = turnpike_proto::fuzz::core(data, std::time::Instant::now());
});
