//! Regenerate the known-answer vectors under `tests/vectors/` and the fuzz seed corpus under
//! `fuzz/corpus/`: `cargo run -p sealed-ota-protocol --example gen-vectors`.

use sealed_ota_protocol::wire::{sample, Decoder};

fn main() -> std::io::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/vectors");
    std::fs::create_dir_all(&dir)?;
    for (name, value) in sealed_ota_protocol::vectors::all() {
        let text = serde_json::to_string_pretty(&value).map_err(std::io::Error::other)? + "\n";
        std::fs::write(dir.join(name), text)?;
        println!("wrote {}", dir.join(name).display());
    }
    // Fuzz seeds: a valid encoding, a truncated one and a bit-flipped one per decoder.
    for d in Decoder::ALL {
        let cdir = root.join("fuzz/corpus").join(d.name());
        std::fs::create_dir_all(&cdir)?;
        let s = sample(d);
        std::fs::write(cdir.join("valid-0"), &s)?;
        std::fs::write(cdir.join("truncated-0"), &s[..s.len() / 2])?;
        let mut f = s.clone();
        let mid = f.len() / 3;
        f[mid] ^= 0x5a;
        std::fs::write(cdir.join("flipped-0"), &f)?;
        println!("wrote {}", cdir.display());
    }
    // Device session seeds: first byte selects the topic (0 notify, 1 update, 2 chunk).
    let sdir = root.join("fuzz/corpus/device_session");
    std::fs::create_dir_all(&sdir)?;
    for (sel, d) in [
        (0u8, Decoder::Notify),
        (1, Decoder::Update),
        (2, Decoder::Chunk),
    ] {
        let mut v = vec![sel];
        v.extend(sample(d));
        std::fs::write(sdir.join(format!("{}-0", d.name())), v)?;
    }
    println!("wrote {}", sdir.display());
    Ok(())
}
