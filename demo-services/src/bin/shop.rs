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
    init_tracing();
    exit_code("shop", tcc_demo_services::shop::run(args.shop).await)
}
