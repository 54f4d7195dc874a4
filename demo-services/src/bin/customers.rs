//! The `shop-customers` binary: see [`tcc_demo_services::customers`].

use clap::Parser;
use tcc_demo_services::runtime::{Common, exit_code, init_tracing};

#[derive(Parser)]
#[command(about = "The demo shop's customers service")]
struct Args {
    #[command(flatten)]
    common: Common,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let tracing = match init_tracing("customers", args.common.otlp_endpoint.as_deref()) {
        Ok(tracing) => tracing,
        Err(e) => return exit_code("shop-customers", Err(e)),
    };
    let result = tcc_demo_services::customers::run(args.common).await;
    tracing.finish().await;
    exit_code("shop-customers", result)
}
