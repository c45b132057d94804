//! `cargo xtask decode-table`: the hypervisor's own DMAR/IORT parsers, on files.

use std::path::PathBuf;
use std::process::ExitCode;

pub fn decode_tables(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for path in files {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{}: cannot read: {e}", path.display());
                ok = false;
                continue;
            }
        };
        let mut text = String::new();
        match iommu::firmware::dump_table(&bytes, &mut text) {
            Ok(()) => {
                if files.len() > 1 {
                    println!("==> {} <==", path.display());
                }
                print!("{text}");
            }
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
