//! The `shop` binary: the composite service, see [`tcc_demo_services::shop`].

use clap::Parser;
use tcc_demo_services::runtime::{exit_code, init_tracing};
use tcc_demo_services::shop::ShopArgs;

#[derive(Parser)]
#[command(about = "The demo shop's composite service")]
struct Args {
    #[command(flatten)]
    shop: ShopArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let tracing = match init_tracing("shop", args.shop.otlp_endpoint.as_deref()) {
        Ok(tracing) => tracing,
        Err(e) => return exit_code("shop", Err(e)),
    };
    let result = tcc_demo_services::shop::run(args.shop).await;
    tracing.finish().await;
    exit_code("shop", result)
}
