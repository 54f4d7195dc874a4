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
    init_tracing();
    exit_code("shop-customers", tcc_demo_services::customers::run(args.common).await)
}
