//! The `portfwd` command line: argument parsing (clap) and one function per
//! command in `commands`, which prints what the operations in `ops` did.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{error, holder, instance, ops};

mod commands;
mod list;

#[derive(Parser)]
#[command(
    name = "portfwd",
    version,
    about = "Publish container ports with eBPF: no iptables rules, no proxy process"
)]
struct Cli {
    /// Directory under a bpf filesystem where portfwd pins its maps and links
    #[arg(long, global = true, value_name = "DIR", env = "PORTFWD_BPFFS", default_value = instance::DEFAULT_PIN_DIR)]
    bpffs: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the programs and pin them (keeps existing mappings)
    Up {
        /// Uplink interface for external traffic (repeatable) [default: the interfaces of the default routes]
        #[arg(long = "iface", value_name = "IF")]
        ifaces: Vec<String>,
        /// cgroup v2 directory to attach the socket programs to [default: the cgroup2 mount]
        #[arg(long, value_name = "PATH")]
        cgroup: Option<PathBuf>,
        /// Replace the attached programs even if they are this build's
        #[arg(long)]
        reload: bool,
        /// Capacity of the mappings map, when it is created [default: 65536]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        max_mappings: Option<u32>,
        /// Capacity of connection tracking, in flows, when it is created [default: 262144]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        max_flows: Option<u32>,
    },
    /// Detach the programs and remove every pin and mapping
    Down {
        /// Keep the state file, so that the next `up` restores the mappings
        #[arg(long)]
        keep_state: bool,
    },
    /// Replace the whole set of mappings with a file's (TOML or JSON)
    Apply {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Only print what would change
        #[arg(long)]
        dry_run: bool,
    },
    /// Forward external traffic arriving on an interface (an uplink)
    Attach {
        #[arg(value_name = "IF")]
        iface: String,
    },
    /// Stop forwarding external traffic of an interface (mappings stay)
    Detach {
        #[arg(value_name = "IF")]
        iface: String,
    },
    /// Publish container ports: PUBLISH is docker's -p syntax, e.g. 8080:80, 127.0.0.1:8080:80/udp, 80
    Map {
        /// Name of the mapping [default: the container address]
        #[arg(long)]
        name: Option<String>,
        /// The container's IPv4 or IPv6 address
        #[arg(value_name = "CONTAINER_IP")]
        container_ip: String,
        /// [[HOSTIP:]HOSTPORT[-END]:]CONTAINERPORT[-END][/tcp|/udp]
        #[arg(value_name = "PUBLISH", required = true)]
        publish: Vec<String>,
        /// Publish even a host port that another process holds
        #[arg(long)]
        force: bool,
    },
    /// Remove mappings by name or by host port: [HOSTIP:]HOSTPORT[-END][/PROTO]
    Unmap {
        #[arg(long)]
        name: Option<String>,
        #[arg(value_name = "HOSTPORT")]
        selectors: Vec<String>,
    },
    /// Show every mapping
    List {
        #[arg(long)]
        json: bool,
    },
    /// The state file (the record of every mapping, restored by `up`)
    State {
        #[command(subcommand)]
        action: StateAction,
    },
    /// The port holder process (started by `up`, stopped by `down`)
    #[command(hide = true)]
    Hold,
}

#[derive(Subcommand)]
enum StateAction {
    /// Rewrite the state file from the kernel's maps (a damaged file is kept as .damaged)
    Rebuild,
}

/// The `portfwd` command line.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(error),
    };
    let pin_dir = cli.bpffs;
    let result = match cli.command {
        Command::Up {
            ifaces,
            cgroup,
            reload,
            max_mappings,
            max_flows,
        } => commands::up(&ops::UpOptions {
            pin_dir,
            cgroup,
            ifaces,
            reload,
            max_mappings,
            max_flows,
        }),
        Command::Down { keep_state } => commands::down(&pin_dir, keep_state),
        Command::Apply { file, dry_run } => commands::apply(&pin_dir, &file, dry_run),
        Command::Attach { iface } => commands::attach(&pin_dir, &iface),
        Command::Detach { iface } => commands::detach(&pin_dir, &iface),
        Command::Map {
            name,
            container_ip,
            publish,
            force,
        } => commands::map(&pin_dir, name.as_deref(), &container_ip, &publish, force),
        Command::Hold => holder::run(&pin_dir),
        Command::Unmap { name, selectors } => {
            commands::unmap(&pin_dir, name.as_deref(), &selectors)
        }
        Command::List { json } => commands::list(&pin_dir, json),
        Command::State {
            action: StateAction::Rebuild,
        } => commands::rebuild_state(&pin_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("portfwd: {error:#}");
            ExitCode::from(error::exit_status(&error))
        }
    }
}

/// Prints a command-line error on one line (help and version as clap
/// renders them) and returns clap's exit status (2 for usage errors).
fn usage_error(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) || matches!(
        error.kind(),
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        // Nothing useful is left to do when stdout is gone.
        error.print().ok();
        return ExitCode::from(error.exit_code() as u8);
    }
    let rendered = error.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    eprintln!("portfwd: {message} (see `portfwd --help`)");
    ExitCode::from(2)
}
