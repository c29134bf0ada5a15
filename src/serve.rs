//! `caseledger serve`: the HTTP server (`crates/server`) over the data dir.
//!
//! It runs on a multi-thread runtime of its own thread (the engine hands blocking work to
//! other workers with `block_in_place`, which a current-thread runtime cannot), until SIGTERM
//! or SIGINT.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;

/// `serve` options.
#[derive(Args, Debug, Clone)]
pub(crate) struct ServeArgs {
    /// Address to listen on (port 0 picks a free one; `DIR/server.json` names it).
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
}

/// Serves the store in `dir` until a signal; exit status 0 after a clean shutdown.
pub(crate) fn run(
    dir: &Path,
    args: &ServeArgs,
    store: Option<jetstream::JetStreamConfig>,
) -> Result<u8> {
    let dir = dir.to_path_buf();
    let addr = args.addr;
    let config = server::ServerConfig {
        store,
        ..server::ServerConfig::default()
    };
    let serving = std::thread::Builder::new()
        .name("serve".into())
        .spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the server runtime")?;
            runtime.block_on(async {
                let server = server::Server::bind(&dir, addr, config)
                    .await
                    .with_context(|| format!("opening {} and binding {addr}", dir.display()))?;
                let bound = server.local_addr()?;
                eprintln!("caseledger serving {} on http://{bound}", dir.display());
                server.run(server::shutdown_signal()).await?;
                Ok(())
            })
        })
        .context("starting the server thread")?;
    match serving.join() {
        Ok(result) => result.map(|()| 0),
        Err(_) => anyhow::bail!("the server thread panicked"),
    }
}
