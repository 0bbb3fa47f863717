//! The checked-in `crds/*.yaml` must equal what `crdgen` renders from the Rust types.

use std::path::PathBuf;

#[test]
fn checked_in_crds_match_the_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let rendered = sealed_ota_operator::crdgen::render().expect("render");
    assert_eq!(rendered.len(), 2);
    for (name, yaml) in rendered {
        let on_disk = std::fs::read_to_string(dir.join(&name)).unwrap_or_else(|e| {
            panic!("crds/{name} missing ({e}); run `sealed-ota-operator crdgen --out crds`")
        });
        assert!(
            on_disk == yaml,
            "crds/{name} drifted from operator/src/crd.rs; run `cargo run -p sealed-ota-operator -- crdgen --out crds`"
        );
    }
}

#[test]
fn crdgen_writes_one_file_per_crd() {
    let tmp = tempfile::tempdir().unwrap();
    let written = sealed_ota_operator::crdgen::write_all(tmp.path()).unwrap();
    assert_eq!(written.len(), 2);
    let names: Vec<_> = written
        .iter()
        .map(|p| p.rsplit('/').next().unwrap().to_owned())
        .collect();
    assert!(names.contains(&"devices.ota.sealed-ota.dev.yaml".to_owned()));
    assert!(names.contains(&"updatecampaigns.ota.sealed-ota.dev.yaml".to_owned()));
}
