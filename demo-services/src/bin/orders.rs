//! The `shop-orders` binary: see [`tcc_demo_services::orders`].

use clap::Parser;
use tcc_demo_services::runtime::{Common, exit_code, init_tracing};

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
    exit_code("shop-orders", tcc_demo_services::orders::run(args.common).await)
}
