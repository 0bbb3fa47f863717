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

/// Recompute the key-schedule and chunk vectors from their inputs with the primitives directly
/// (sha2, hkdf, p256, aes-gcm), without the crate's helpers, so the committed vectors pin the
/// specification in docs/protocol.md and not just the code.
#[test]
fn vectors_match_an_independent_computation_of_the_spec() {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use sha2::{Digest, Sha256};

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("key_schedule.json")).unwrap())
            .unwrap();
    let i = &v["inputs"];
    let sk = |k: &str| p256::SecretKey::from_slice(&h(&i[k])).unwrap();
    let (ms, ds, me, de) = (
        sk("manager_static_secret"),
        sk("device_static_secret"),
        sk("manager_ephemeral_secret"),
        sk("device_ephemeral_secret"),
    );
    let pubb = |k: &p256::SecretKey| k.public_key().to_encoded_point(false).as_bytes().to_vec();
    assert_eq!(pubb(&me), h(&v["manager_ephemeral_public"]));
    assert_eq!(pubb(&de), h(&v["device_ephemeral_public"]));
    let mut t = Sha256::new();
    t.update(b"sealed-ota/v2/transcript");
    t.update([2u8]); // wire version
    let fields: Vec<Vec<u8>> = vec![
        b"p1".to_vec(),
        b"s1".to_vec(),
        b"c1".to_vec(),
        h(&i["session_id"]),
        h(&i["manager_nonce"]),
        h(&i["device_nonce"]),
        pubb(&me),
        pubb(&de),
        h(&i["manager_cert_fingerprint"]),
        h(&i["device_cert_fingerprint"]),
    ];
    for f in &fields {
        t.update((f.len() as u32).to_be_bytes());
        t.update(f);
    }
    let th: [u8; 32] = t.finalize().into();
    assert_eq!(th.to_vec(), h(&v["transcript_hash"]));
    let ecdh = |a: &p256::SecretKey, b: &p256::SecretKey| {
        p256::ecdh::diffie_hellman(a.to_nonzero_scalar(), b.public_key().as_affine())
            .raw_secret_bytes()
            .to_vec()
    };
    let mut ikm = ecdh(&de, &me); // computed from the device side
    ikm.extend(ecdh(&ds, &ms));
    let hk = hkdf::Hkdf::<Sha256>::new(Some(&th), &ikm);
    let mut m2d = [0u8; 32];
    let mut d2m = [0u8; 32];
    hk.expand(b"sealed-ota/v2/key/manager-to-device", &mut m2d)
        .unwrap();
    hk.expand(b"sealed-ota/v2/key/device-to-manager", &mut d2m)
        .unwrap();
    assert_eq!(m2d.to_vec(), h(&v["key_manager_to_device"]));
    assert_eq!(d2m.to_vec(), h(&v["key_device_to_manager"]));
    let mut aad = b"sealed-ota/v2/update".to_vec();
    aad.extend_from_slice(&th);
    assert_eq!(aad, h(&v["update_aead"]["aad"]));

    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join("chunk_encryption.json")).unwrap(),
    )
    .unwrap();
    let key: [u8; 32] = h(&c["content_key"]).try_into().unwrap();
    let cipher = aes_gcm::Aes256Gcm::new(&key.into());
    let count = c["count"].as_u64().unwrap() as u32;
    for ch in c["chunks"].as_array().unwrap() {
        let idx = ch["index"].as_u64().unwrap() as u32;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&u64::from(idx).to_be_bytes());
        let mut aad = b"sealed-ota/v2/chunk".to_vec();
        aad.extend_from_slice(&2u32.to_be_bytes());
        aad.extend_from_slice(b"c1");
        aad.extend_from_slice(&idx.to_be_bytes());
        aad.extend_from_slice(&count.to_be_bytes());
        let pt = h(&ch["plaintext"]);
        let ct = cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: &pt,
                    aad: &aad,
                },
            )
            .unwrap();
        assert_eq!(ct, h(&ch["ciphertext"]));
        let mut leaf = Sha256::new();
        leaf.update([0u8]);
        leaf.update(idx.to_be_bytes());
        leaf.update(&ct);
        assert_eq!(leaf.finalize().to_vec(), h(&ch["leaf_hash"]));
    }

    // Merkle: recompute the 3-leaf root by hand: node(node(l0, l1), l2).
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("merkle.json")).unwrap()).unwrap();
    let t3 = &m["trees"][2];
    let l: Vec<Vec<u8>> = (0..3).map(|k| h(&t3["leaves"][k])).collect();
    let node = |a: &[u8], b: &[u8]| {
        let mut s = Sha256::new();
        s.update([1u8]);
        s.update(a);
        s.update(b);
        s.finalize().to_vec()
    };
    assert_eq!(node(&node(&l[0], &l[1]), &l[2]), h(&t3["root"]));
}

/// The release signature and the receipt signature checked with the primitives directly (p256,
/// sha2): the statement built by hand from docs/protocol.md, the signature in low-S form.
#[test]
fn release_and_receipt_vectors_match_an_independent_computation() {
    use p256::ecdsa::signature::Verifier;
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use sha2::{Digest, Sha256};

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("release.json")).unwrap())
            .unwrap();
    let secret = p256::SecretKey::from_slice(&h(&v["release_secret"])).unwrap();
    let public = secret
        .public_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec();
    assert_eq!(public, h(&v["public_key"]));
    assert_eq!(Sha256::digest(&public).to_vec(), h(&v["key_id"]));
    let version = v["version"].as_str().unwrap();
    let mut statement = b"sealed-ota/v2/release".to_vec();
    statement.extend_from_slice(&(version.len() as u32).to_be_bytes());
    statement.extend_from_slice(version.as_bytes());
    statement.extend_from_slice(&v["size"].as_u64().unwrap().to_be_bytes());
    statement.extend_from_slice(&h(&v["sha256"]));
    assert_eq!(statement, h(&v["statement"]));
    let sig = p256::ecdsa::Signature::from_slice(&h(&v["signature"])).unwrap();
    assert!(sig.normalize_s().is_none(), "low S");
    p256::ecdsa::VerifyingKey::from(secret.public_key())
        .verify(&statement, &sig)
        .unwrap();

    // The receipt of messages.json: signed over "sealed-ota/v2/sig/" || 6 || body.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("messages.json")).unwrap())
            .unwrap();
    let signer = p256::SecretKey::from_slice(&h(&m["signing_secret"])).unwrap();
    let (env, body) = wire::decode_receipt(&h(&m["messages"]["receipt"])).unwrap();
    let mut input = b"sealed-ota/v2/sig/".to_vec();
    input.push(6);
    input.extend_from_slice(&env.body);
    p256::ecdsa::VerifyingKey::from(signer.public_key())
        .verify(
            &input,
            &p256::ecdsa::Signature::from_slice(&env.sig).unwrap(),
        )
        .unwrap();
    assert!(matches!(
        body.claim,
        sealed_ota_protocol::Claim::Installed { .. }
    ));
}
