//! Regenerate the known-answer vectors: `cargo run -p sealed-ota-protocol --example gen-vectors`.

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    std::fs::create_dir_all(&dir)?;
    for (name, value) in sealed_ota_protocol::vectors::all() {
        let text = serde_json::to_string_pretty(&value).map_err(std::io::Error::other)? + "\n";
        std::fs::write(dir.join(name), text)?;
        println!("wrote {}", dir.join(name).display());
    }
    Ok(())
}
