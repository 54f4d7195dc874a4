//! The `shop` binary: the composite service, see [`tcc_demo_services::shop`].

use clap::Parser;
use tcc_demo_services::runtime;
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
    let otlp = args.shop.otlp_endpoint.clone();
    runtime::main("shop", "shop", otlp.as_deref(), tcc_demo_services::shop::run(args.shop)).await
}
