//! Handshake and bulk-encryption cost beside the raw primitives, measured in the same run, and the
//! MQTT interactions of one campaign. `cargo bench -p sealed-ota-protocol --bench protocol` prints
//! criterion reports, then a ratio table (protocol throughput / raw-crypto throughput) as required
//! by the budgets (DESIGN.md §5: handshakes >= 0.8 x raw crypto, bulk encryption >= 0.8 x raw
//! aes-gcm, <= 6 MQTT interactions per device per phase), then the interaction counts of a firmware
//! and a rotation campaign driven through real sessions (`interactions`).
//!
//! Environment: `SEALED_OTA_BENCH_RATIOS_ONLY=1` skips criterion; `SEALED_OTA_BENCH_JSON=<path>`
//! also writes every figure as one JSON object; `SEALED_OTA_BENCH_IMAGE_BYTES` (default 1 MiB),
//! `SEALED_OTA_BENCH_CHUNK_BYTES` (65536) and `SEALED_OTA_BENCH_WINDOW` (8) size the counted
//! firmware campaign.

mod interactions;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use criterion::{Criterion, Throughput};
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use rand_core::OsRng;
use sealed_ota_protocol::*;
use serde_json::json;

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
        release_keys: Vec::new(),
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
            release: None,
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

/// Mean time of `run` over at least `min`, each run on a fresh input from `setup` and its result
/// dropped, both outside the timed part.
fn timed_apart<I, O>(
    mut setup: impl FnMut() -> I,
    mut run: impl FnMut(I) -> O,
    min: Duration,
) -> f64 {
    let (mut spent, mut n) = (Duration::ZERO, 0u32);
    while spent < min {
        let input = setup();
        let t0 = Instant::now();
        let out = black_box(run(input));
        spent += t0.elapsed();
        n += 1;
        drop(out);
    }
    spent.as_secs_f64() / f64::from(n)
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
    // What every signature cost before the identity kept its signing key: the key made from
    // the secret (a scalar multiplication for the public key) and then the signature.
    g.bench_function("ecdsa_sign_key_made_each_time", |bch| {
        bch.iter(|| -> Signature { SigningKey::from(&a).sign(b"m") })
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

/// Why the benchmark could not produce its figures.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    /// An environment variable is not a valid number.
    #[error("{name}={value:?} is not a positive number")]
    Env {
        /// Variable name.
        name: &'static str,
        /// Its value.
        value: String,
    },
    /// The JSON file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// Target path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The JSON could not be serialized.
    #[error("serializing the figures: {0}")]
    Json(#[from] serde_json::Error),
    /// The counted campaign did not complete.
    #[error("interaction count: {0}")]
    Sim(#[from] interactions::SimError),
}

/// What the environment asks for.
struct Config {
    ratios_only: bool,
    json: Option<PathBuf>,
    image_bytes: usize,
    chunk_bytes: u32,
    window: u32,
}

fn env_number<T: std::str::FromStr + PartialOrd + Default>(
    name: &'static str,
    default: T,
) -> Result<T, BenchError> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(value) => match value.trim().parse::<T>() {
            Ok(n) if n > T::default() => Ok(n),
            _ => Err(BenchError::Env { name, value }),
        },
    }
}

impl Config {
    fn from_env() -> Result<Self, BenchError> {
        Ok(Self {
            ratios_only: std::env::var("SEALED_OTA_BENCH_RATIOS_ONLY").is_ok_and(|v| v == "1"),
            json: std::env::var_os("SEALED_OTA_BENCH_JSON")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
            image_bytes: env_number("SEALED_OTA_BENCH_IMAGE_BYTES", 1024 * 1024)?,
            chunk_bytes: env_number("SEALED_OTA_BENCH_CHUNK_BYTES", 65536)?,
            window: env_number("SEALED_OTA_BENCH_WINDOW", 8)?,
        })
    }
}

/// Best-of-rounds figures, seconds per operation (per `IMAGE` bytes for the bulk ones).
struct Ratios {
    rounds: u32,
    keygen: f64,
    ecdh: f64,
    sign: f64,
    verify: f64,
    mgr: f64,
    dev: f64,
    gcm: f64,
    enc: f64,
    prep: f64,
    stepwise: f64,
    sha: f64,
}

impl Ratios {
    /// Primitive work of one manager handshake: keygen (ephemeral) + 2 ECDH + 2 sign (notify,
    /// manifest) + 2 verify (device cert chain signature, ready signature).
    fn raw_mgr(&self) -> f64 {
        self.keygen + 2.0 * self.ecdh + 2.0 * self.sign + 2.0 * self.verify
    }
    /// Device: keygen + 2 ECDH + 1 sign (ready) + 3 verify (manager cert chain, notify, manifest).
    fn raw_dev(&self) -> f64 {
        self.keygen + 2.0 * self.ecdh + self.sign + 3.0 * self.verify
    }
    /// Best `prepare` could do with the measured primitives on `threads()` threads: the work is
    /// one AES-GCM and two SHA-256 passes, of which the image SHA-256 is one sequential chain.
    fn prep_bound(&self) -> f64 {
        self.sha.max((self.gcm + 2.0 * self.sha) / threads() as f64)
    }
    fn bytes_per_sec(t: f64) -> f64 {
        IMAGE as f64 / t
    }
}

/// What `PreparedCampaign::prepare` did before its single-pass, multi-threaded version
/// (2026-11-24), rebuilt from the public primitives as the baseline of that optimisation (same
/// run, same work): on one thread, encrypt every chunk into its own buffer, hash every ciphertext
/// for the Merkle leaves, build the tree, copy each ciphertext into its CBOR chunk message, then
/// hash the whole image.
fn stepwise_prepare(key: &[u8; 32], image: &[u8]) -> (Vec<Vec<u8>>, [u8; 32], [u8; 32]) {
    let cipher = crypto::ChunkCipher::new(key);
    let count = image.len().div_ceil(CHUNK as usize) as u32;
    let cts: Vec<Vec<u8>> = image
        .chunks(CHUNK as usize)
        .enumerate()
        .map(|(i, p)| cipher.encrypt("c1", i as u32, count, p))
        .collect();
    let tree = merkle::MerkleTree::from_leaves(
        cts.iter()
            .enumerate()
            .map(|(i, ct)| merkle::leaf_hash(i as u32, ct))
            .collect(),
    );
    let payloads = cts
        .into_iter()
        .enumerate()
        .map(|(i, ct)| {
            wire::encode_msg(&wire::ChunkMsg {
                v: WIRE_VERSION,
                campaign_id: "c1".into(),
                index: i as u32,
                count,
                ct,
                proof: tree.proof(i as u32),
            })
        })
        .collect();
    (payloads, tree.root(), crypto::sha256(image))
}

/// The ratio table, all measured now, on one core (except `prepare`, which uses `threads()` and is
/// also shown against its bound and against `stepwise_prepare`). Other processes share this
/// machine, so each metric is measured in several interleaved rounds and the best (least
/// disturbed) round is kept.
fn measure_ratios(fx: &Fx) -> Ratios {
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
        release: None,
    };
    let inf = f64::INFINITY;
    let mut r = Ratios {
        rounds,
        keygen: inf,
        ecdh: inf,
        sign: inf,
        verify: inf,
        mgr: inf,
        dev: inf,
        gcm: inf,
        enc: inf,
        prep: inf,
        stepwise: inf,
        sha: inf,
    };
    for _ in 0..rounds {
        let raw = raw_costs(min);
        r.keygen = r.keygen.min(raw.keygen);
        r.ecdh = r.ecdh.min(raw.ecdh);
        r.sign = r.sign.min(raw.sign);
        r.verify = r.verify.min(raw.verify);
        let n = 60;
        r.mgr = r
            .mgr
            .min(manager_handshakes(fx, n).as_secs_f64() / n as f64);
        r.dev = r.dev.min(device_handshakes(fx, n).as_secs_f64() / n as f64);
        r.gcm = r
            .gcm
            .min(IMAGE as f64 / raw_gcm_bytes_per_sec(&mut image, min));
        // The manager's path: each chunk encrypted into a freshly allocated message buffer.
        r.enc = r.enc.min(per_op(
            || {
                let cipher = crypto::ChunkCipher::new(&key);
                for (i, c) in image.chunks(CHUNK as usize).enumerate() {
                    let mut out = Vec::with_capacity(c.len() + 1024);
                    cipher.encrypt_into("c1", i as u32, count, c, &mut out);
                    black_box(out);
                }
            },
            min,
        ));
        r.sha = r.sha.min(per_op(
            || {
                black_box(crypto::sha256(&image));
            },
            min,
        ));
        // The image is moved into the spec: copy it outside the timed part, and drop the result
        // outside it too (the operator keeps a prepared campaign for the campaign's lifetime).
        r.prep = r.prep.min(timed_apart(
            || spec(image.clone()),
            |s| PreparedCampaign::prepare(s).expect("prepare"),
            min,
        ));
        r.stepwise = r
            .stepwise
            .min(timed_apart(|| (), |()| stepwise_prepare(&key, &image), min));
    }
    r
}

fn print_ratios(r: &Ratios) {
    let mbs = |t: f64| Ratios::bytes_per_sec(t) / 1e6;
    println!(
        "\n=== sealed-ota-protocol budget ratios (same run, one core except full prepare, best of {}) ===",
        r.rounds
    );
    println!(
        "raw: keygen {:.1} us, ECDH {:.1} us, sign {:.1} us, verify {:.1} us, aes-256-gcm {:.0} MB/s, sha-256 {:.0} MB/s",
        r.keygen * 1e6,
        r.ecdh * 1e6,
        r.sign * 1e6,
        r.verify * 1e6,
        mbs(r.gcm),
        mbs(r.sha)
    );
    println!(
        "manager handshake: {:.0} us ({:.0}/s); raw crypto {:.0} us; ratio {:.2} (budget >= 0.8)",
        r.mgr * 1e6,
        1.0 / r.mgr,
        r.raw_mgr() * 1e6,
        r.raw_mgr() / r.mgr
    );
    println!(
        "device handshake:  {:.0} us ({:.0}/s); raw crypto {:.0} us; ratio {:.2}",
        r.dev * 1e6,
        1.0 / r.dev,
        r.raw_dev() * 1e6,
        r.raw_dev() / r.dev
    );
    println!(
        "chunk encryption: {:.0} MB/s; ratio vs raw aes-gcm {:.2} (budget >= 0.8)",
        mbs(r.enc),
        r.gcm / r.enc
    );
    println!(
        "full prepare (encrypt + SHA-256 of image and ciphertexts + Merkle + encode, threads: {}): {:.0} MB/s; ratio vs raw aes-gcm {:.2}, vs raw aes-gcm + 2 x sha-256 {:.2}",
        threads(),
        mbs(r.prep),
        r.gcm / r.prep,
        (r.gcm + 2.0 * r.sha) / r.prep
    );
    println!(
        "  bound with these primitives on that many threads (AES-GCM + 2 x SHA-256, image SHA-256 sequential): ratio {:.2}",
        r.gcm / r.prep_bound()
    );
    println!(
        "  the same work step by step on one thread (prepare before its optimisation): {:.0} MB/s; ratio vs raw aes-gcm {:.2}",
        mbs(r.stepwise),
        r.gcm / r.stepwise
    );
}

/// Threads `PreparedCampaign::prepare` uses for the bulk image here.
fn threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(sealer::MAX_PREPARE_THREADS)
}

/// Interaction counts of the firmware and the rotation campaign.
struct Interactions {
    firmware: interactions::Counts,
    rotation: interactions::Counts,
}

impl Interactions {
    /// The largest control count of one phase (the windowed chunk transfer is reported apart).
    fn per_device_phase(&self) -> u64 {
        [
            self.firmware.inner_channel(),
            self.firmware.update(),
            self.rotation.inner_channel(),
            self.rotation.update(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    /// SUBSCRIBE + UNSUBSCRIBE per window (an integer when every window costs the same).
    fn transfer_per_window(&self) -> serde_json::Value {
        let (total, windows) = (self.firmware.transfer_control(), self.firmware.windows);
        if windows > 0 && total % windows == 0 {
            json!(total / windows)
        } else {
            json!(total as f64 / windows.max(1) as f64)
        }
    }
}

fn print_interactions(cfg: &Config, i: &Interactions) {
    let (f, r) = (&i.firmware, &i.rotation);
    println!(
        "\n=== MQTT interactions per device (firmware {} bytes, chunks of {}, window {}; counted from the sessions' actions) ===",
        cfg.image_bytes, cfg.chunk_bytes, cfg.window
    );
    println!(
        "firmware: inner channel {}, update control {}, transfer {} windows x {} (SUBSCRIBE + UNSUBSCRIBE) + {} chunk deliveries; per-device bytes published by the manager {}",
        f.inner_channel(),
        f.update(),
        f.windows,
        i.transfer_per_window(),
        f.chunk_deliveries(),
        f.wrap_bytes
    );
    println!(
        "rotation: inner channel {}, update {}; most per device per phase {} (paper: 6)",
        r.inner_channel(),
        r.update(),
        i.per_device_phase()
    );
}

fn to_json(cfg: &Config, r: &Ratios, i: &Interactions) -> serde_json::Value {
    let bps = Ratios::bytes_per_sec;
    json!({
        "handshake_ratio": r.raw_mgr() / r.mgr,
        "device_handshake_ratio": r.raw_dev() / r.dev,
        "crypto_ratio": r.gcm / r.enc,
        "prepare_ratio": r.gcm / r.prep,
        "prepare_ratio_vs_gcm_plus_two_sha256": (r.gcm + 2.0 * r.sha) / r.prep,
        "prepare_ratio_bound": r.gcm / r.prep_bound(),
        "stepwise_prepare_ratio": r.gcm / r.stepwise,
        "stepwise_prepare_bytes_per_second": bps(r.stepwise),
        "prepare_threads": threads(),
        "handshakes_per_second": 1.0 / r.mgr,
        "raw_handshake_crypto_per_second": 1.0 / r.raw_mgr(),
        "device_handshakes_per_second": 1.0 / r.dev,
        "raw_device_handshake_crypto_per_second": 1.0 / r.raw_dev(),
        "aes_gcm_bytes_per_second": bps(r.gcm),
        "chunk_encryption_bytes_per_second": bps(r.enc),
        "prepare_bytes_per_second": bps(r.prep),
        "sha256_bytes_per_second": bps(r.sha),
        "keygen_us": r.keygen * 1e6,
        "ecdh_us": r.ecdh * 1e6,
        "sign_us": r.sign * 1e6,
        "verify_us": r.verify * 1e6,
        "rounds": r.rounds,
        "bulk_image_bytes": IMAGE,
        "bulk_chunk_bytes": CHUNK,
        "mqtt_campaign": {
            "image_bytes": cfg.image_bytes,
            "chunk_bytes": cfg.chunk_bytes,
            "window": cfg.window,
        },
        "mqtt_interactions": {
            "inner_channel": i.firmware.inner_channel(),
            "firmware_update_control": i.firmware.update(),
            "firmware_transfer_per_window": i.transfer_per_window(),
            "firmware_transfer_control": i.firmware.transfer_control(),
            "windows": i.firmware.windows,
            "chunk_deliveries": i.firmware.chunk_deliveries(),
            "rotation_inner_channel": i.rotation.inner_channel(),
            "rotation_update": i.rotation.update(),
        },
        "mqtt_interactions_per_device_phase": i.per_device_phase(),
        "wrap_bytes": i.firmware.wrap_bytes,
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), BenchError> {
    let err = |source| BenchError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).map_err(err)
}

fn main() -> Result<(), BenchError> {
    let cfg = Config::from_env()?;
    let fx = fixture();
    if !cfg.ratios_only {
        let mut c = Criterion::default()
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .configure_from_args();
        criterion_benches(&mut c, &fx);
        c.final_summary();
    }
    let ratios = measure_ratios(&fx);
    print_ratios(&ratios);
    let counts = Interactions {
        firmware: interactions::firmware(cfg.image_bytes, cfg.chunk_bytes, cfg.window)?,
        rotation: interactions::rotation()?,
    };
    print_interactions(&cfg, &counts);
    if let Some(path) = &cfg.json {
        write_json(path, &to_json(&cfg, &ratios, &counts))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}
