//! The daemon's plan parser (`/etc/kiln/plan.json` is read before anything runs).
//! Properties: never panics; whatever parses re-serializes to canonical bytes that parse back
//! to the same plan (the bundle tamper check compares plan bytes, so this must be stable).
#![no_main]

use kiln_plan::Plan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Plan::from_json(data) {
        Ok(plan) => {
            let bytes = plan.to_json();
            let again = Plan::from_json(&bytes).expect("canonical plan bytes parse");
            assert_eq!(again, plan, "plan changed across to_json/from_json");
            assert_eq!(
                again.to_json(),
                bytes,
                "canonical bytes are not a fixed point"
            );
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
