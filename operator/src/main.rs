//! The `appset-operator` binary: parses the flags and runs [`appset_operator::runtime::main`].

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let options = appset_operator::runtime::Options::parse();
    match appset_operator::runtime::main(options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("appset-operator: {err}");
            ExitCode::FAILURE
        }
    }
}
