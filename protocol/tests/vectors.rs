//! Known-answer vectors: the committed JSON under `tests/vectors/` must equal what the code computes
//! from the fixed inputs, and the values are cross-checked independently where possible.
//! Regenerate: `cargo run -p sealed-ota-protocol --example gen-vectors`
//! (or `SEALED_OTA_REGEN_VECTORS=1 cargo test -p sealed-ota-protocol --test vectors`).

use sealed_ota_protocol::{crypto, merkle, vectors, wire};

fn dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn h(v: &serde_json::Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("hex")
}

#[test]
fn committed_vectors_match_the_code() {
    let regen = std::env::var("SEALED_OTA_REGEN_VECTORS").is_ok();
    for (name, value) in vectors::all() {
        let path = dir().join(name);
        if regen {
            std::fs::write(&path, serde_json::to_string_pretty(&value).unwrap() + "\n").unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let committed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            committed, value,
            "{name} differs from the code: regenerate and review the diff"
        );
    }
}

#[test]
fn key_schedule_vector_is_self_consistent() {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("key_schedule.json")).unwrap())
            .unwrap();
    let th: [u8; 32] = h(&v["transcript_hash"]).try_into().unwrap();
    let ee: [u8; 32] = h(&v["ecdh_ephemeral"]).try_into().unwrap();
    let ss: [u8; 32] = h(&v["ecdh_static"]).try_into().unwrap();
    let keys = crypto::derive_session_keys(&th, &ee, &ss);
    assert_eq!(keys.m2d.to_vec(), h(&v["key_manager_to_device"]));
    assert_eq!(keys.d2m.to_vec(), h(&v["key_device_to_manager"]));
    let a = &v["update_aead"];
    let nonce: [u8; 12] = h(&a["nonce"]).try_into().unwrap();
    let pt = crypto::open(&keys.m2d, &nonce, &h(&a["aad"]), &h(&a["ciphertext"])).unwrap();
    assert_eq!(pt.to_vec(), h(&a["plaintext"]));
    // ECDH symmetric from the other side.
    let ms = p256::SecretKey::from_slice(&h(&v["inputs"]["manager_static_secret"])).unwrap();
    let ds = p256::SecretKey::from_slice(&h(&v["inputs"]["device_static_secret"])).unwrap();
    assert_eq!(crypto::ecdh(&ds, &ms.public_key()).to_vec(), ss.to_vec());
}

#[test]
fn chunk_and_merkle_vectors_decrypt_and_verify() {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join("chunk_encryption.json")).unwrap(),
    )
    .unwrap();
    let key: [u8; 32] = h(&v["content_key"]).try_into().unwrap();
    let count = v["count"].as_u64().unwrap() as u32;
    for c in v["chunks"].as_array().unwrap() {
        let i = c["index"].as_u64().unwrap() as u32;
        let pt = crypto::decrypt_chunk(&key, "c1", i, count, &h(&c["ciphertext"])).unwrap();
        assert_eq!(pt.to_vec(), h(&c["plaintext"]));
        assert!(crypto::decrypt_chunk(&key, "c2", i, count, &h(&c["ciphertext"])).is_none());
    }
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("merkle.json")).unwrap()).unwrap();
    for t in m["trees"].as_array().unwrap() {
        let n = t["count"].as_u64().unwrap() as u32;
        let root: [u8; 32] = h(&t["root"]).try_into().unwrap();
        for i in 0..n {
            let leaf = merkle::leaf_hash(i, &h(&t["ciphertexts"][i as usize]));
            let proof: Vec<[u8; 32]> = t["proofs"][i as usize]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| h(p).try_into().unwrap())
                .collect();
            assert!(merkle::verify_proof(&root, i, n, leaf, &proof));
        }
    }
}

#[test]
fn message_vectors_decode() {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("messages.json")).unwrap())
            .unwrap();
    let secret = p256::SecretKey::from_slice(&h(&v["signing_secret"])).unwrap();
    for d in wire::Decoder::ALL {
        let bytes = h(&v["messages"][d.name()]);
        d.decode(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", d.name()));
    }
    let (env, body) = wire::decode_notify(&h(&v["messages"]["notify"])).unwrap();
    env.verify(&secret.public_key(), "notify").unwrap();
    assert_eq!(body.device_id, "s1");
}
