//! Delta manifests: the manager's signature covers every field a delta adds (a broker must not
//! swap one delta for another, or a delta for the full image), and the codec rebuilds a real
//! binary from another build of it.

use sealed_ota_protocol::manifest::{DeltaManifest, Manifest, PayloadKind};
use sealed_ota_protocol::wire::{self, SignedEnvelope, TYPE_MANIFEST};

/// A delta field's name and a change to it.
type Swap = (&'static str, fn(&mut DeltaManifest));

fn delta_manifest() -> Manifest {
    Manifest {
        campaign_id: "c1".into(),
        device_id: "s1".into(),
        version: "2.0.0".into(),
        size: 10_000,
        sha256: [0xaa; 32],
        chunk_size: 1000,
        chunk_count: 2,
        merkle_root: [0xbb; 32],
        expires_at: 1_800_003_600,
        allow_downgrade: false,
        kind: PayloadKind::Firmware,
        release: None,
        pull: false,
        delta: Some(DeltaManifest {
            base_version: "1.0.0".into(),
            base_sha256: [0xcc; 32],
            size: 1500,
        }),
    }
}

/// Every delta field reaches the signed bytes: the signed manifest decodes to the same delta, and
/// a manifest with any one delta field changed (or the delta removed) does not verify under the
/// original signature. Fails when a field is kept out of the encoding (`#[serde(skip)]`).
#[test]
fn the_signature_covers_every_delta_field() {
    let secret = p256::SecretKey::from_bytes(&[0x11; 32].into()).unwrap();
    let public = secret.public_key();
    let genuine = delta_manifest();
    let env = SignedEnvelope::sign(
        &p256::ecdsa::SigningKey::from(&secret),
        TYPE_MANIFEST,
        wire::encode_msg(&genuine),
    );
    let (decoded_env, decoded) = wire::decode_manifest(&env.encode()).unwrap();
    decoded_env.verify(&public, "manifest").unwrap();
    assert_eq!(
        decoded, genuine,
        "every field round-trips through the signed bytes"
    );

    let swaps: [Swap; 3] = [
        ("base_version", |d| d.base_version = "1.0.1".into()),
        ("base_sha256", |d| d.base_sha256[31] ^= 1),
        ("size", |d| d.size += 1),
    ];
    for (field, swap) in swaps {
        let mut forged = genuine.clone();
        swap(forged.delta.as_mut().unwrap());
        let forged_env = SignedEnvelope {
            body: wire::encode_msg(&forged),
            ..env.clone()
        };
        assert!(
            forged_env.verify(&public, "manifest").is_err(),
            "a changed delta {field} verified under the original signature"
        );
    }
    let full = Manifest {
        delta: None,
        ..genuine.clone()
    };
    let swapped = SignedEnvelope {
        body: wire::encode_msg(&full),
        ..env
    };
    assert!(
        swapped.verify(&public, "manifest").is_err(),
        "the delta removed verified"
    );
}

/// The transfer of a delta manifest is the delta's; of a full one, the image's.
#[test]
fn a_delta_manifest_transfers_the_delta_and_describes_the_full_image() {
    let m = delta_manifest();
    let t = m.transfer();
    assert_eq!(
        (t.size, t.chunk_count, t.merkle_root),
        (1500, 2, [0xbb; 32])
    );
    assert_eq!(m.chunk_len(1), Some(500));
    assert_eq!(m.chunk_len(2), None);
    assert!(m.chunking_consistent(wire::MAX_CHUNK_SIZE, wire::MAX_CHUNK_COUNT));
    let full = Manifest { delta: None, ..m };
    assert_eq!(full.transfer().size, 10_000);
    assert!(
        !full.chunking_consistent(wire::MAX_CHUNK_SIZE, wire::MAX_CHUNK_COUNT),
        "2 chunks of 1000 do not cover the full 10000 bytes"
    );
}

/// A delta between two builds of a real program (this test binary and the protocol crate's
/// library are not two releases, so the pair is this binary and a copy with a patched range):
/// rebuilt byte for byte.
#[test]
fn a_delta_of_a_real_binary_rebuilds_it() {
    let mut base = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    base.truncate(8 << 20);
    let mut target = base.clone();
    let at = target.len() / 3;
    target[at..at + 4096]
        .iter_mut()
        .for_each(|b| *b = b.wrapping_mul(3));
    target.extend_from_slice(b"release 2");
    let delta = sealed_ota_protocol::delta::make(&base, &target).unwrap();
    let mut rebuilt = Vec::new();
    sealed_ota_protocol::delta::apply(&base, &delta[..], &mut rebuilt, target.len() as u64)
        .unwrap();
    assert!(rebuilt == target, "rebuilt image differs");
    assert!(delta.len() < target.len() / 20, "{} bytes", delta.len());
}

/// A delta the caller made and sealed ([`CampaignPayload::SealedDelta`], the operator's cache
/// path) prepares the campaign the in-memory `Delta` does: the chunks carry the delta, the
/// manifest describes the full image and names the base. A delta manifest whose size is not what
/// was sealed is refused.
#[test]
fn a_delta_sealed_by_the_caller_prepares_like_one_made_in_memory() {
    use sealed_ota_protocol::{
        crypto::sha256, CampaignPayload, CampaignSpec, PreparedCampaign, SealedFirmware,
    };
    let base: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut image = base.clone();
    image[1000..1100].fill(9);
    let mut delta = Vec::new();
    sealed_ota_protocol::delta::make_to(&base, &image, &mut delta).unwrap();
    assert_eq!(
        delta,
        sealed_ota_protocol::delta::make(&base, &image).unwrap()
    );
    let spec = |payload| CampaignSpec {
        campaign_id: "c1-d0".into(),
        target_version: "2.0.0".into(),
        payload,
        expires_at: u64::MAX,
        chunk_size: 1024,
        release: None,
    };
    let made = PreparedCampaign::prepare(spec(CampaignPayload::Delta {
        base_version: "1.0.0".into(),
        base: base.clone(),
        image: image.clone(),
    }))
    .unwrap();
    let (sealed, _) = SealedFirmware::seal_all("c1-d0", 1024, &delta).unwrap();
    let manifest = DeltaManifest {
        base_version: "1.0.0".into(),
        base_sha256: sha256(&base),
        size: delta.len() as u64,
    };
    let sealed_delta = |manifest: DeltaManifest| CampaignPayload::SealedDelta {
        sealed: sealed.clone(),
        delta: manifest,
        image_size: image.len() as u64,
        image_sha256: sha256(&image),
    };
    let prepared = PreparedCampaign::prepare(spec(sealed_delta(manifest.clone()))).unwrap();
    assert_eq!(prepared.delta(), made.delta());
    assert_eq!(prepared.delta(), Some(&manifest));
    assert_eq!(
        (prepared.image_size(), prepared.image_sha256()),
        (image.len() as u64, sha256(&image))
    );
    assert_eq!(prepared.transfer_size(), made.transfer_size());
    assert_eq!(prepared.chunk_count(), made.chunk_count());
    let wrong = DeltaManifest {
        size: manifest.size + 1,
        ..manifest
    };
    assert!(PreparedCampaign::prepare(spec(sealed_delta(wrong))).is_err());
}
