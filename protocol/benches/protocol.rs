//! Handshake and bulk-encryption cost beside the raw primitives, measured in the same run.
//! `cargo bench -p sealed-ota-protocol --bench protocol` prints criterion reports, then a ratio
//! table (protocol throughput / raw-crypto throughput) as required by the budgets (DESIGN.md §5):
//! handshakes >= 0.8 x raw crypto, bulk encryption >= 0.8 x raw aes-gcm.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use criterion::{Criterion, Throughput};
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use rand_core::OsRng;
use sealed_ota_protocol::*;

const NOW: u64 = 1_800_000_000;
const IMAGE: usize = 8 * 1024 * 1024;
const CHUNK: u32 = 64 * 1024;

struct Fx {
    mcfg: ManagerConfig,
    dcfg: DeviceConfig,
    campaign: Arc<PreparedCampaign>,
}

fn fixture() -> Fx {
    let ca = CertificateAuthority::generate("ca", NOW, 10).unwrap();
    let trust = Arc::new(ca.trust_anchor());
    let topics = Arc::new(TopicTree::new("iot", "p1").unwrap());
    let mcfg = ManagerConfig {
        identity: Arc::new(ca.issue(Role::Manager, "p1", NOW, 10).unwrap()),
        trust: trust.clone(),
        topics: topics.clone(),
    };
    let dcfg = DeviceConfig {
        identity: Arc::new(ca.issue(Role::Device, "s1", NOW, 10).unwrap()),
        trust,
        topics,
        manager_id: "p1".into(),
        max_packet_size: 0,
        window: 16,
    };
    let campaign = Arc::new(
        PreparedCampaign::prepare(CampaignSpec {
            campaign_id: "c1".into(),
            target_version: "2.0.0".into(),
            payload: CampaignPayload::Firmware {
                image: vec![0x5a; 4096],
            },
            expires_at: NOW + 3600,
            chunk_size: 1024,
        })
        .unwrap(),
    );
    Fx {
        mcfg,
        dcfg,
        campaign,
    }
}

fn target() -> DeviceTarget {
    DeviceTarget {
        device_id: "s1".into(),
        pinned_fingerprint: None,
        allow_downgrade: false,
    }
}

fn publish(a: &[Action]) -> Inbound {
    a.iter()
        .find_map(|a| match a {
            Action::Publish(o) => Some(o.to_inbound()),
            _ => None,
        })
        .expect("publish")
}

/// Time of the manager side of `n` handshakes (start + handle(ready)), device work excluded.
fn manager_handshakes(fx: &Fx, n: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..n {
        let t0 = Instant::now();
        let (mut ms, a) =
            ManagerSession::start(&fx.mcfg, fx.campaign.clone(), target(), NOW).unwrap();
        total += t0.elapsed();
        let notify = publish(&a);
        let (mut ds, _) = DeviceSession::new(fx.dcfg.clone(), DeviceState::new("1.0.0"));
        let ready = publish(&ds.handle(&notify, NOW).unwrap().actions);
        let t1 = Instant::now();
        let out = ms.handle(&ready, NOW).unwrap();
        total += t1.elapsed();
        black_box(out);
    }
    total
}

/// Time of the device side of `n` handshakes (handle(notify) + handle(update)).
fn device_handshakes(fx: &Fx, n: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..n {
        let (mut ms, a) =
            ManagerSession::start(&fx.mcfg, fx.campaign.clone(), target(), NOW).unwrap();
        let notify = publish(&a);
        let (mut ds, _) = DeviceSession::new(fx.dcfg.clone(), DeviceState::new("1.0.0"));
        let t0 = Instant::now();
        let ready = publish(&ds.handle(&notify, NOW).unwrap().actions);
        total += t0.elapsed();
        let update = publish(&ms.handle(&ready, NOW).unwrap().actions);
        let t1 = Instant::now();
        let out = ds.handle(&update, NOW).unwrap();
        total += t1.elapsed();
        black_box(out);
    }
    total
}

struct Raw {
    keygen: f64,
    ecdh: f64,
    sign: f64,
    verify: f64,
}

fn per_op<F: FnMut()>(mut f: F, min: Duration) -> f64 {
    for _ in 0..20 {
        f();
    }
    let mut n = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < min {
        for _ in 0..10 {
            f();
        }
        n += 10;
    }
    t0.elapsed().as_secs_f64() / n as f64
}

fn raw_costs(min: Duration) -> Raw {
    let a = p256::SecretKey::random(&mut OsRng);
    let b = p256::SecretKey::random(&mut OsRng).public_key();
    let sk = SigningKey::from(&a);
    let vk = VerifyingKey::from(&sk);
    let msg = [7u8; 300];
    let sig: Signature = sk.sign(&msg);
    Raw {
        keygen: per_op(
            || {
                black_box(p256::SecretKey::random(&mut OsRng).public_key());
            },
            min,
        ),
        ecdh: per_op(
            || {
                drop(black_box(p256::ecdh::diffie_hellman(
                    a.to_nonzero_scalar(),
                    b.as_affine(),
                )))
            },
            min,
        ),
        sign: per_op(
            || {
                black_box::<Signature>(sk.sign(&msg));
            },
            min,
        ),
        verify: per_op(|| black_box(vk.verify(&msg, &sig)).unwrap(), min),
    }
}

fn raw_gcm_bytes_per_sec(data: &mut [u8], min: Duration) -> f64 {
    let cipher = Aes256Gcm::new(&[9u8; 32].into());
    let nonce = Nonce::from([0u8; 12]);
    let t = per_op(
        || {
            for c in data.chunks_mut(CHUNK as usize) {
                black_box(cipher.encrypt_in_place_detached(&nonce, b"aad", c).unwrap());
            }
        },
        min,
    );
    data.len() as f64 / t
}

fn criterion_benches(c: &mut Criterion, fx: &Fx) {
    let mut g = c.benchmark_group("raw");
    let a = p256::SecretKey::random(&mut OsRng);
    let b = p256::SecretKey::random(&mut OsRng).public_key();
    let sk = SigningKey::from(&a);
    let vk = VerifyingKey::from(&sk);
    let sig: Signature = sk.sign(b"m");
    g.bench_function("p256_keygen", |bch| {
        bch.iter(|| p256::SecretKey::random(&mut OsRng).public_key())
    });
    g.bench_function("p256_ecdh", |bch| {
        bch.iter(|| p256::ecdh::diffie_hellman(a.to_nonzero_scalar(), b.as_affine()))
    });
    g.bench_function("ecdsa_sign", |bch| {
        bch.iter(|| -> Signature { sk.sign(b"m") })
    });
    g.bench_function("ecdsa_verify", |bch| bch.iter(|| vk.verify(b"m", &sig)));
    let cipher = Aes256Gcm::new(&[9u8; 32].into());
    let mut buf = vec![0u8; CHUNK as usize];
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("aes256gcm_64k", |bch| {
        bch.iter(|| {
            cipher
                .encrypt_in_place_detached(&Nonce::from([0u8; 12]), b"aad", &mut buf)
                .unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("protocol");
    g.bench_function("manager_handshake", |bch| {
        bch.iter_custom(|n| manager_handshakes(fx, n))
    });
    g.bench_function("device_handshake", |bch| {
        bch.iter_custom(|n| device_handshakes(fx, n))
    });
    let key = [9u8; 32];
    let pt = vec![0u8; CHUNK as usize];
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("encrypt_chunk_64k", |bch| {
        bch.iter(|| crypto::encrypt_chunk(&key, "c1", 3, 128, &pt))
    });
    g.finish();
}

fn main() {
    let fx = fixture();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    criterion_benches(&mut c, &fx);
    c.final_summary();

    // Ratio table, all measured now, one core. Other processes share this machine, so each metric
    // is measured in several interleaved rounds and the best (least disturbed) round is kept.
    let min = Duration::from_millis(300);
    let rounds = 5;
    let key = [9u8; 32];
    let count = (IMAGE / CHUNK as usize) as u32;
    let mut image = vec![0x5au8; IMAGE];
    let spec = |img: Vec<u8>| CampaignSpec {
        campaign_id: "c1".into(),
        target_version: "2.0.0".into(),
        payload: CampaignPayload::Firmware { image: img },
        expires_at: NOW + 3600,
        chunk_size: CHUNK,
    };
    let inf = f64::INFINITY;
    let (mut keygen, mut ecdh, mut sign, mut verify) = (inf, inf, inf, inf);
    let (mut mgr, mut dev, mut gcm_t, mut enc_t, mut prep_t, mut sha_t) =
        (inf, inf, inf, inf, inf, inf);
    for _ in 0..rounds {
        let raw = raw_costs(min);
        keygen = keygen.min(raw.keygen);
        ecdh = ecdh.min(raw.ecdh);
        sign = sign.min(raw.sign);
        verify = verify.min(raw.verify);
        let n = 60;
        mgr = mgr.min(manager_handshakes(&fx, n).as_secs_f64() / n as f64);
        dev = dev.min(device_handshakes(&fx, n).as_secs_f64() / n as f64);
        gcm_t = gcm_t.min(IMAGE as f64 / raw_gcm_bytes_per_sec(&mut image, min));
        enc_t = enc_t.min(per_op(
            || {
                let cipher = crypto::ChunkCipher::new(&key);
                for (i, c) in image.chunks(CHUNK as usize).enumerate() {
                    black_box(cipher.encrypt("c1", i as u32, count, c));
                }
            },
            min,
        ));
        sha_t = sha_t.min(per_op(
            || {
                black_box(crypto::sha256(&image));
            },
            min,
        ));
        let img = image.clone();
        let t0 = Instant::now();
        black_box(PreparedCampaign::prepare(spec(img)).unwrap());
        prep_t = prep_t.min(t0.elapsed().as_secs_f64());
    }
    // Primitive work one handshake needs on each side:
    // manager: keygen (ephemeral) + 2 ECDH + 2 sign (notify, manifest) + 2 verify (device cert
    //          chain signature, ready signature);
    // device:  keygen + 2 ECDH + 1 sign (ready) + 3 verify (manager cert chain, notify, manifest).
    let raw_mgr = keygen + 2.0 * ecdh + 2.0 * sign + 2.0 * verify;
    let raw_dev = keygen + 2.0 * ecdh + sign + 3.0 * verify;
    let mbs = |t: f64| IMAGE as f64 / t / 1e6;
    println!("\n=== sealed-ota-protocol budget ratios (same run, one core, best of {rounds}) ===");
    println!(
        "raw: keygen {:.1} us, ECDH {:.1} us, sign {:.1} us, verify {:.1} us, aes-256-gcm {:.0} MB/s, sha-256 {:.0} MB/s",
        keygen * 1e6,
        ecdh * 1e6,
        sign * 1e6,
        verify * 1e6,
        mbs(gcm_t),
        mbs(sha_t)
    );
    println!(
        "manager handshake: {:.0} us ({:.0}/s); raw crypto {:.0} us; ratio {:.2} (budget >= 0.8)",
        mgr * 1e6,
        1.0 / mgr,
        raw_mgr * 1e6,
        raw_mgr / mgr
    );
    println!(
        "device handshake:  {:.0} us ({:.0}/s); raw crypto {:.0} us; ratio {:.2}",
        dev * 1e6,
        1.0 / dev,
        raw_dev * 1e6,
        raw_dev / dev
    );
    println!(
        "chunk encryption: {:.0} MB/s; ratio vs raw aes-gcm {:.2} (budget >= 0.8)",
        mbs(enc_t),
        gcm_t / enc_t
    );
    println!(
        "full prepare (encrypt + SHA-256 of image and ciphertexts + Merkle + encode): {:.0} MB/s; ratio vs raw aes-gcm {:.2}, vs raw aes-gcm + 2 x sha-256 {:.2}",
        mbs(prep_t),
        gcm_t / prep_t,
        (gcm_t + 2.0 * sha_t) / prep_t
    );
}
