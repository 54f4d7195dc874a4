//! Warns at build time when PostgreSQL is not installed: the cluster tests
//! then skip (and say so in their output), which is easy to miss.

fn main() {
    println!("cargo:rerun-if-changed=/usr/lib/postgresql");
    println!("cargo:rerun-if-env-changed=TCC_PG_BIN");
    let installed = std::env::var_os("TCC_PG_BIN").is_some()
        || std::fs::read_dir("/usr/lib/postgresql")
            .map(|dirs| dirs.flatten().any(|d| d.path().join("bin/postgres").is_file()))
            .unwrap_or(false);
    if !installed {
        println!(
            "cargo:warning=PostgreSQL is not installed: the cluster tests (PostgreSQL store, several coordinators) \
             will be SKIPPED. Install it with `apt-get install -y postgresql` to run them; CI (.ci/run) does."
        );
    }
}
