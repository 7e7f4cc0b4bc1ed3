//! Replays every input of `fuzz/corpus/<target>/` (the seeds and what `make fuzz` found
//! worth keeping) through its target: a crash the fuzzer once found stays fixed.
use std::fs;
use std::path::Path;

/// A fuzz target: panics when an invariant breaks.
type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("config", idemgate_fuzz::config),
    ("key_header", idemgate_fuzz::key_header),
    ("body", idemgate_fuzz::body),
    ("record", idemgate_fuzz::record),
    ("etcd", idemgate_fuzz::etcd),
    ("render", idemgate_fuzz::render),
];

#[test]
fn every_corpus_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut total = 0;
    for (name, target) in TARGETS {
        let dir = root.join(name);
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut n = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let data = fs::read(&path).unwrap();
            if let Err(e) = std::panic::catch_unwind(|| target(&data)) {
                panic!("{name}: {} fails: {e:?}", path.display());
            }
            n += 1;
        }
        assert!(n > 0, "{name}: empty corpus in {}", dir.display());
        total += n;
    }
    println!("replayed {total} corpus inputs");
}
