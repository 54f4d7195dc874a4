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
    let tracing = match init_tracing("orders", args.common.otlp_endpoint.as_deref()) {
        Ok(tracing) => tracing,
        Err(e) => return exit_code("shop-orders", Err(e)),
    };
    let result = tcc_demo_services::orders::run(args.common).await;
    tracing.finish().await;
    exit_code("shop-orders", result)
}
