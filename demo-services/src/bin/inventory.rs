//! The `shop-inventory` binary: see [`tcc_demo_services::inventory`].

use clap::Parser;
use tcc_demo_services::runtime::{Common, init_tracing};

#[derive(Parser)]
#[command(about = "The demo shop's inventory service")]
struct Args {
    #[command(flatten)]
    common: Common,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_tracing();
    match tcc_demo_services::inventory::run(args.common).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shop-inventory: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
