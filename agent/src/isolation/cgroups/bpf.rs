//! The devices controller of cgroup v2: a `BPF_PROG_TYPE_CGROUP_DEVICE` program, run by the
//! kernel on every open/mknod of a device node by a process of the cgroup, that answers 1
//! (allow) for an entry of the task's allow-list and 0 (deny) for anything else.
//!
//! The program is assembled here by hand ([`program`], a few instructions per rule, as runc's
//! `devicefilter` does), loaded with the `bpf(2)` syscall (`BPF_PROG_LOAD`) and attached to the
//! task's cgroup directory (`BPF_PROG_ATTACH`, `BPF_CGROUP_DEVICE`, `BPF_F_ALLOW_MULTI` so that
//! programs of the parents, e.g. systemd's, still run too). No `aya` or `libbpf`: a heavy
//! dependency (and a BPF toolchain) for ~40 instructions. The attachment holds the program; it
//! goes away with the cgroup directory.
//!
//! `unsafe`: the `bpf(2)` syscall has no safe wrapper in `libc` or `nix`.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::super::devices::{DeviceKind, DeviceRule};
use super::{limit_err, CgroupError};

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    /// Opcode.
    pub code: u8,
    /// Destination register (low nibble) and source register (high nibble).
    pub regs: u8,
    /// Jump offset or memory offset.
    pub off: i16,
    /// Immediate.
    pub imm: i32,
}

// Opcodes (linux/bpf_common.h, linux/bpf.h).
const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const ALU32_AND_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const ALU32_RSH_K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JNE_X: u8 = 0x5d; // BPF_JMP | BPF_JNE | BPF_X
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

// `struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }`: access_type is
// `(access << 16) | type`.
const DEV_BLOCK: i32 = 1; // BPF_DEVCG_DEV_BLOCK
const DEV_CHAR: i32 = 2; // BPF_DEVCG_DEV_CHAR
const ACC_MKNOD: i32 = 1; // BPF_DEVCG_ACC_MKNOD
const ACC_READ: i32 = 2; // BPF_DEVCG_ACC_READ
const ACC_WRITE: i32 = 4; // BPF_DEVCG_ACC_WRITE

// Registers: r1 the context; r2 type, r3 access, r4 major, r5 minor; r6 scratch; r0 the answer.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;
const R6: u8 = 6;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: (src << 4) | (dst & 0x0f), off, imm }
}

/// The program for `rules`: the access is allowed when one rule matches its type (or is
/// [`DeviceKind::All`]), grants every access asked for, and matches its major and minor (or
/// has them as any); denied otherwise.
pub fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut prog = vec![
        insn(LDX_MEM_W, R2, R1, 0, 0),
        insn(ALU32_AND_K, R2, 0, 0, 0xffff),
        insn(LDX_MEM_W, R3, R1, 0, 0),
        insn(ALU32_RSH_K, R3, 0, 0, 16),
        insn(LDX_MEM_W, R4, R1, 4, 0),
        insn(LDX_MEM_W, R5, R1, 8, 0),
    ];
    for rule in rules {
        // The rule's checks, each jumping past the rest of the block when it does not match;
        // the offsets are filled in once the block's length is known.
        let mut block: Vec<Insn> = Vec::new();
        match rule.kind {
            DeviceKind::Char => block.push(insn(JNE_K, R2, 0, 0, DEV_CHAR)),
            DeviceKind::Block => block.push(insn(JNE_K, R2, 0, 0, DEV_BLOCK)),
            DeviceKind::All => {}
        }
        let access = [(rule.mknod, ACC_MKNOD), (rule.read, ACC_READ), (rule.write, ACC_WRITE)]
            .iter()
            .filter(|(on, _)| *on)
            .fold(0, |acc, (_, bit)| acc | bit);
        if access != ACC_MKNOD | ACC_READ | ACC_WRITE {
            // (asked & granted) == asked
            block.push(insn(MOV64_X, R6, R3, 0, 0));
            block.push(insn(ALU32_AND_K, R6, 0, 0, access));
            block.push(insn(JNE_X, R6, R3, 0, 0));
        }
        if let Some(major) = rule.major {
            block.push(insn(JNE_K, R4, 0, 0, major as i32));
        }
        if let Some(minor) = rule.minor {
            block.push(insn(JNE_K, R5, 0, 0, minor as i32));
        }
        block.push(insn(MOV64_K, R0, 0, 0, 1));
        block.push(insn(EXIT, 0, 0, 0, 0));
        let len = block.len();
        for (i, ins) in block.iter_mut().enumerate() {
            if ins.code == JNE_K || ins.code == JNE_X {
                // Past the block: from the instruction after this one to the block's end.
                ins.off = (len - i - 1) as i16;
            }
        }
        prog.extend(block);
    }
    prog.push(insn(MOV64_K, R0, 0, 0, 0));
    prog.push(insn(EXIT, 0, 0, 0, 0));
    prog
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The `BPF_PROG_LOAD` part of `union bpf_attr`, padded to the size the kernel reads (it
/// checks that bytes past what it knows are zero).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    _rest: [u64; 8],
}

/// The `BPF_PROG_ATTACH` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _rest: [u32; 11],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly sized `#[repr(C)]` prefix of `union bpf_attr` for
    // `cmd`, and every pointer inside it points to memory that outlives the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret)
}

/// Loads the program for `rules` and attaches it to the cgroup directory `dir`.
pub fn attach(dir: &Path, rules: &[DeviceRule]) -> Result<(), CgroupError> {
    let prog = program(rules);
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 64 * 1024];
    let mut load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        ..Default::default()
    };
    load.prog_name[..10].copy_from_slice(b"mlp_device");
    let fd = match bpf(BPF_PROG_LOAD, &mut load) {
        Ok(fd) => fd,
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let verifier = String::from_utf8_lossy(&log[..end]).trim().to_string();
            return Err(limit_err(dir, "device filter (BPF_PROG_LOAD)", format!("{e}; verifier: {verifier}")));
        }
    };
    // SAFETY: a successful BPF_PROG_LOAD returns a new file descriptor this process owns.
    let prog_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let cgroup = std::fs::File::open(dir).map_err(|e| limit_err(dir, "device filter (opening the cgroup)", e))?;
    let mut at = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog_fd.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..Default::default()
    };
    bpf(BPF_PROG_ATTACH, &mut at).map_err(|e| limit_err(dir, "device filter (BPF_PROG_ATTACH)", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `prog` the way the kernel would, for the subset of eBPF it uses.
    fn run(prog: &[Insn], kind: i32, access: i32, major: u32, minor: u32) -> u64 {
        let ctx = [((access << 16) | kind) as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            let (dst, src) = ((i.regs & 0x0f) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, 1, "loads only from the context");
                    r[dst] = u64::from(ctx[i.off as usize / 4]);
                }
                ALU32_AND_K => r[dst] = u64::from((r[dst] as u32) & (i.imm as u32)),
                ALU32_RSH_K => r[dst] = u64::from((r[dst] as u32) >> i.imm),
                MOV64_K => r[dst] = i.imm as i64 as u64,
                MOV64_X => r[dst] = r[src],
                JNE_K if r[dst] != i.imm as i64 as u64 => pc += i.off as usize,
                JNE_X if r[dst] != r[src] => pc += i.off as usize,
                JNE_K | JNE_X => {}
                EXIT => return r[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    #[test]
    fn the_program_allows_exactly_the_rules() {
        let ro_block = DeviceRule { kind: DeviceKind::Block, major: Some(7), minor: None, read: true, write: false, mknod: false };
        let rules = [DeviceRule::char_rwm(1, Some(3)), DeviceRule::char_rwm(136, None), DeviceRule::char_rwm(195, Some(1)), ro_block];
        let prog = program(&rules);
        let rw = ACC_READ | ACC_WRITE;
        assert_eq!(run(&prog, DEV_CHAR, rw, 1, 3), 1, "/dev/null");
        assert_eq!(run(&prog, DEV_CHAR, rw, 136, 42), 1, "any pts");
        assert_eq!(run(&prog, DEV_CHAR, ACC_MKNOD, 195, 1), 1, "the assigned GPU");
        assert_eq!(run(&prog, DEV_CHAR, rw, 195, 2), 0, "another GPU");
        assert_eq!(run(&prog, DEV_CHAR, rw, 1, 5), 0, "/dev/zero is not in the list");
        assert_eq!(run(&prog, DEV_BLOCK, rw, 1, 3), 0, "a block device with a listed char number");
        assert_eq!(run(&prog, DEV_BLOCK, ACC_READ, 7, 9), 1, "read of any loop device");
        assert_eq!(run(&prog, DEV_BLOCK, rw, 7, 9), 0, "write was not granted");
        assert_eq!(run(&program(&[]), DEV_CHAR, ACC_READ, 1, 3), 0, "an empty list denies all");
        // The encoding itself: the header, then per rule type/major/minor checks, r0 = 1, exit.
        assert_eq!(prog[6], insn(JNE_K, R2, 0, 4, DEV_CHAR), "skips the 4 instructions after it");
        assert_eq!(prog[7], insn(JNE_K, R4, 0, 3, 1));
        assert_eq!(prog[8], insn(JNE_K, R5, 0, 2, 3));
        assert_eq!(prog[9], insn(MOV64_K, R0, 0, 0, 1));
        assert_eq!(prog.last(), Some(&insn(EXIT, 0, 0, 0, 0)));
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }
}
