//! The `shop-customers` binary: see [`tcc_demo_services::customers`].

use clap::Parser;
use tcc_demo_services::runtime::{self, Common};

#[derive(Parser)]
#[command(about = "The demo shop's customers service")]
struct Args {
    #[command(flatten)]
    common: Common,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let otlp = args.common.otlp_endpoint.clone();
    runtime::main("shop-customers", "customers", otlp.as_deref(), tcc_demo_services::customers::run(args.common)).await
}
