//! The committed CRD YAML under `charts/appset/files/crds/` must be exactly what the types generate.

use std::path::PathBuf;

#[test]
fn committed_crds_are_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/appset/files/crds");
    let files = appset_crds::generate::render().expect("render CRDs");
    assert_eq!(files.len(), 2);
    for (name, generated) in files {
        let path = dir.join(&name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} is stale or missing: run `make crds` (cargo run -p appset-crds --bin crdgen) and commit the result",
            path.display()
        );
    }
}
