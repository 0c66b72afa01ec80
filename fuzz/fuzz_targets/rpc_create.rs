//! JSON-RPC `create` parameters from a client: parsing, then validation into a sandbox
//! configuration (the reference's messages).
#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_api::rpc::CreateParams;

fuzz_target!(|data: &[u8]| {
    if let Ok(params) = serde_json::from_slice::<CreateParams>(data) {
        let _ = params.to_config();
    }
});
