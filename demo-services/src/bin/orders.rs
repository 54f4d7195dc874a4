//! The `shop-orders` binary: see [`tcc_demo_services::orders`].

use clap::Parser;
use tcc_demo_services::runtime::{Common, init_tracing};

#[derive(Parser)]
#[command(about = "The demo shop's orders service")]
struct Args {
    #[command(flatten)]
    common: Common,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_tracing();
    match tcc_demo_services::orders::run(args.common).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shop-orders: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
