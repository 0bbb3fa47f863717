//! Entry point of the `sealed-ota-device-emulator` binary.

fn main() {
    eprintln!("sealed-ota-device-emulator: the emulator arrives with the emulator issue");
    std::process::exit(2);
}
