//! Writes the appset CRDs into a directory (default `charts/appset/files/crds`, which the chart
//! renders as templates), or prints them with `--stdout`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let files = match appset_crds::generate::render() {
        Ok(files) => files,
        Err(err) => {
            eprintln!("crdgen: cannot render the CRDs: {err}");
            return ExitCode::FAILURE;
        }
    };
    if args.iter().any(|a| a == "--stdout") {
        for (_, text) in &files {
            print!("---\n{text}");
        }
        return ExitCode::SUCCESS;
    }
    let dir = args.first().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/appset/files/crds"
        ))
    });
    if let Err(err) = std::fs::create_dir_all(&dir) {
        eprintln!("crdgen: cannot create {}: {err}", dir.display());
        return ExitCode::FAILURE;
    }
    for (name, text) in files {
        let path = dir.join(name);
        if let Err(err) = std::fs::write(&path, text) {
            eprintln!("crdgen: cannot write {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
