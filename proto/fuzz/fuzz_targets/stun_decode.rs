#![no_main]
//! The STUN decoder on arbitrary datagrams.
libfuzzer_sys::fuzz_target!(|data: &[u8]| turnpike_proto::fuzz::decode(data));
