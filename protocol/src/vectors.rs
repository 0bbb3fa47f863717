//! Known-answer test vectors computed from fixed inputs. `tests/vectors.rs` checks the committed
//! JSON files under `tests/vectors/` against these; regenerate them with
//! `cargo run -p sealed-ota-protocol --example gen-vectors` (or
//! `SEALED_OTA_REGEN_VECTORS=1 cargo test -p sealed-ota-protocol --test vectors`).
//! Only fixed, public test keys appear here.

use crate::prelude::*;

use serde_json::{json, Value};

use crate::crypto::{self, Transcript};
use crate::merkle::{leaf_hash, MerkleTree};
use crate::wire::{sample, Decoder};

fn scalar(byte: u8) -> p256::SecretKey {
    let mut b = [byte; 32];
    b[0] = 0x01; // keep below the group order
    p256::SecretKey::from_bytes(&b.into()).expect("valid scalar")
}

/// `key_schedule.json`: ECDH, transcript hash and HKDF session keys.
pub fn key_schedule() -> Value {
    let (ms, ds, me, de) = (scalar(0x21), scalar(0x22), scalar(0x23), scalar(0x24));
    let me_pub = crypto::public_bytes(&me.public_key());
    let de_pub = crypto::public_bytes(&de.public_key());
    let session_id = [0x31u8; 16];
    let (mn, dn) = ([0x32u8; 32], [0x33u8; 32]);
    let (mfp, dfp) = ([0x34u8; 32], [0x35u8; 32]);
    let t = Transcript {
        manager_id: "p1",
        device_id: "s1",
        campaign_id: "c1",
        session_id: &session_id,
        manager_nonce: &mn,
        device_nonce: &dn,
        manager_ephemeral: &me_pub,
        device_ephemeral: &de_pub,
        manager_cert_fingerprint: &mfp,
        device_cert_fingerprint: &dfp,
    };
    let th = t.hash();
    let ee = crypto::ecdh(&me, &de.public_key());
    let ss = crypto::ecdh(&ms, &ds.public_key());
    let keys = crypto::derive_session_keys(&th, &ee, &ss);
    let update_nonce = [0x36u8; 12];
    let aad = crypto::session_aad(crate::wire::UPDATE_AAD_LABEL, &th, &[]);
    let ct = crypto::seal_with_nonce(&keys.m2d, &update_nonce, &aad, b"sealed-ota update body");
    json!({
        "description": "Transcript hash, ECDH and HKDF-SHA256 session keys (salt = transcript hash, ikm = ECDH(eph,eph) || ECDH(static,static))",
        "inputs": {
            "manager_static_secret": hex::encode(ms.to_bytes()),
            "device_static_secret": hex::encode(ds.to_bytes()),
            "manager_ephemeral_secret": hex::encode(me.to_bytes()),
            "device_ephemeral_secret": hex::encode(de.to_bytes()),
            "manager_id": "p1", "device_id": "s1", "campaign_id": "c1",
            "session_id": hex::encode(session_id),
            "manager_nonce": hex::encode(mn), "device_nonce": hex::encode(dn),
            "manager_cert_fingerprint": hex::encode(mfp), "device_cert_fingerprint": hex::encode(dfp),
        },
        "manager_ephemeral_public": hex::encode(&me_pub),
        "device_ephemeral_public": hex::encode(&de_pub),
        "transcript_hash": hex::encode(th),
        "ecdh_ephemeral": hex::encode(*ee),
        "ecdh_static": hex::encode(*ss),
        "key_manager_to_device": hex::encode(keys.m2d),
        "key_device_to_manager": hex::encode(keys.d2m),
        "update_aead": {
            "nonce": hex::encode(update_nonce),
            "aad": hex::encode(&aad),
            "plaintext": hex::encode(b"sealed-ota update body"),
            "ciphertext": hex::encode(&ct),
        }
    })
}

/// `chunk_encryption.json`: AES-256-GCM chunks under a content key, index-derived nonces.
pub fn chunk_encryption() -> Value {
    let key = [0x41u8; 32];
    let count = 3u32;
    let chunks: Vec<Value> = (0..count)
        .map(|i| {
            let pt: Vec<u8> = (0..(if i == 2 { 5 } else { 16 }))
                .map(|b| b as u8 ^ i as u8)
                .collect();
            let ct = crypto::encrypt_chunk(&key, "c1", i, count, &pt);
            json!({
                "index": i,
                "nonce": hex::encode(crypto::chunk_nonce(i)),
                "aad": hex::encode(crypto::chunk_aad("c1", i, count)),
                "plaintext": hex::encode(&pt),
                "ciphertext": hex::encode(&ct),
                "leaf_hash": hex::encode(leaf_hash(i, &ct)),
            })
        })
        .collect();
    json!({
        "description": "Chunk encryption: AES-256-GCM, nonce = 0^32 || index u64 BE, AAD = label || len(campaign) u32 BE || campaign || index u32 BE || count u32 BE",
        "content_key": hex::encode(key),
        "campaign_id": "c1",
        "count": count,
        "chunks": chunks,
    })
}

/// `merkle.json`: trees of 1..=7 leaves over fixed ciphertexts.
pub fn merkle() -> Value {
    let trees: Vec<Value> = (1u32..=7)
        .map(|n| {
            let cts: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; 3 + i as usize]).collect();
            let leaves: Vec<[u8; 32]> =
                cts.iter().enumerate().map(|(i, c)| leaf_hash(i as u32, c)).collect();
            let tree = MerkleTree::from_leaves(leaves.clone());
            json!({
                "count": n,
                "ciphertexts": cts.iter().map(hex::encode).collect::<Vec<_>>(),
                "leaves": leaves.iter().map(hex::encode).collect::<Vec<_>>(),
                "root": hex::encode(tree.root()),
                "proofs": (0..n).map(|i| tree.proof(i).iter().map(hex::encode).collect::<Vec<_>>()).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "description": "Merkle tree: leaf = SHA-256(0x00 || index u32 BE || ct), node = SHA-256(0x01 || l || r), unpaired node promoted",
        "trees": trees,
    })
}

/// `messages.json`: CBOR encodings of every message with fixed inputs (signatures are RFC 6979
/// deterministic; the signing key's scalar is 0x11 repeated).
pub fn messages() -> Value {
    let mut m = serde_json::Map::new();
    for d in Decoder::ALL {
        m.insert(d.name().to_string(), Value::String(hex::encode(sample(d))));
    }
    json!({
        "description": "Wire format v2 encodings with fixed inputs (see wire::sample)",
        "signing_secret": hex::encode([0x11u8; 32]),
        "messages": Value::Object(m),
    })
}

/// `release.json`: a release signature (low S) of a fixed image statement by a fixed release key,
/// and the key id.
pub fn release() -> Value {
    let signer = crate::release::ReleaseSigner::from_secret(scalar(0x51));
    let (version, size, sha) = ("1.4.2", 4096u64, [0x61u8; 32]);
    let sig = signer.sign(version, size, &sha);
    json!({
        "description": "Release signature: ECDSA P-256 SHA-256 (low S) over \"sealed-ota/v2/release\" || len(version) u32 BE || version || size u64 BE || sha256; key id = SHA-256(SEC1 uncompressed public key)",
        "release_secret": hex::encode(scalar(0x51).to_bytes()),
        "public_key": hex::encode(&sig.public_key),
        "key_id": hex::encode(sig.key_id()),
        "version": version,
        "size": size,
        "sha256": hex::encode(sha),
        "statement": hex::encode(crate::release::statement(version, size, &sha)),
        "signature": hex::encode(sig.signature),
    })
}

/// Every vector file: (file name, content).
pub fn all() -> Vec<(&'static str, Value)> {
    vec![
        ("key_schedule.json", key_schedule()),
        ("chunk_encryption.json", chunk_encryption()),
        ("merkle.json", merkle()),
        ("messages.json", messages()),
        ("release.json", release()),
    ]
}
