fn main() {
    let obj = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));
    let mut ebpf = aya::Ebpf::load(obj).unwrap();
    for (name, p) in ebpf.programs_mut() {
        let r = match p {
            aya::programs::Program::CgroupSockAddr(p) => p.load(),
            aya::programs::Program::SockOps(p) => p.load(),
            _ => Ok(()),
        };
        println!("{name}: {:?}", r);
    }
}
