//! The daemon's readers of its own state files: the journal (`/var/lib/kiln/journal.json`,
//! read on every start, possibly half-written by a crash on a filesystem without atomic
//! rename guarantees) and status.json (read by `kiln-firstboot status` and the QEMU harness).
//! Properties: never panics; what parses round-trips unchanged; a status renders.
#![no_main]

use kiln_firstboot::journal::Journal;
use kiln_firstboot::status::Status;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(j) = Journal::from_json(data) {
        let bytes = serde_json::to_vec(&j).expect("journal serializes");
        let again = Journal::from_json(&bytes).expect("serialized journal parses");
        assert_eq!(again, j, "journal changed across a round trip");
        let _ = j.facts();
    }
    if let Ok(s) = Status::from_json(data) {
        let bytes = serde_json::to_vec(&s).expect("status serializes");
        let again = Status::from_json(&bytes).expect("serialized status parses");
        assert_eq!(
            serde_json::to_value(&again).unwrap(),
            serde_json::to_value(&s).unwrap(),
            "status changed across a round trip"
        );
        let _ = s.render();
    }
});
