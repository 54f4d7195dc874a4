//! The `shop-orders` binary: see [`tcc_demo_services::orders`].

use clap::Parser;
use tcc_demo_services::runtime::{self, Common};

#[derive(Parser)]
#[command(about = "The demo shop's orders service")]
struct Args {
    #[command(flatten)]
    common: Common,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let otlp = args.common.otlp_endpoint.clone();
    runtime::main("shop-orders", "orders", otlp.as_deref(), tcc_demo_services::orders::run(args.common)).await
}
