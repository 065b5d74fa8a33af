//! The `portfwd` binary: the CLI (`portfwd::cli`), or the CNI plugin
//! (`portfwd::cni`) when a runtime runs it as one.

// The binary is a shim over the library, whose dependencies these are.
#![allow(unused_crate_dependencies)]

use std::process::ExitCode;

fn main() -> ExitCode {
    // Run by the name `docker-proxy` (dockerd's userland-proxy-path), the
    // binary is Docker's proxy (see `portfwd::docker_proxy`).
    if portfwd::docker_proxy::invoked_as_proxy() {
        return portfwd::docker_proxy::main();
    }
    // Run by a CNI runtime (CNI_COMMAND set, no arguments), the binary is the
    // CNI plugin. Its children (the port holder) get arguments, and so are
    // the CLI even though they inherit CNI_COMMAND.
    if std::env::var_os("CNI_COMMAND").is_some() && std::env::args_os().len() == 1 {
        return portfwd::cni::main();
    }
    portfwd::cli::main()
}
