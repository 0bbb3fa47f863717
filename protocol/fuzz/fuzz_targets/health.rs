//! Fuzz the `health` decoder: any input must return Ok or a typed error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealed_ota_protocol::wire::Decoder;

fuzz_target!(|data: &[u8]| {
    let _ = Decoder::Health.decode(data);
});
