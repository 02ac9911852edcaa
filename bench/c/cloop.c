/*
 * cloop: the smallest VMM loop that runs a pyvmm tiny guest, as the reference for
 * bench/exit_roundtrip.py. Same guest image, same PVH entry, same in-kernel irqchip;
 * each exit is handled with a switch and nothing else (no buses, no accounting).
 *
 *   cloop IMAGE.bin ENTRY32 CMDLINE
 * Loads the flat image at 0x100000, enters at ENTRY32 in 32-bit protected mode with
 * ebx = hvm_start_info, prints the guest's UART output to stdout, and exits with
 * the guest's test-exit code ((v << 1) | 1) or 0 on an i8042 reset.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define MEM_SIZE (64UL << 20)
#define die(msg) do { perror(msg); exit(99); } while (0)

int main(int argc, char **argv)
{
    if (argc < 4) { fprintf(stderr, "usage: cloop IMAGE ENTRY32 CMDLINE\n"); return 98; }
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000);
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)mem };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");

    FILE *f = fopen(argv[1], "rb");
    if (!f) die(argv[1]);
    size_t n = fread(mem + 0x100000, 1, MEM_SIZE - 0x100000, f);
    fclose(f);
    if (!n) die("empty image");
    /* struct hvm_start_info at 0x6000, command line at 0x7000 */
    uint32_t *si = (uint32_t *)(mem + 0x6000);
    si[0] = 0x336ec578; si[1] = 1;
    *(uint64_t *)(mem + 0x6000 + 24) = 0x7000;
    strncpy((char *)mem + 0x7000, argv[3], 4000);

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap run");
    struct { struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[256]; } cpuid = { .c.nent = 256 };
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, &cpuid) < 0) die("KVM_SET_CPUID2");

    struct kvm_sregs sregs;
    ioctl(vcpu, KVM_GET_SREGS, &sregs);
    struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 0x18, .type = 0xb,
                                .present = 1, .s = 1, .db = 1, .g = 1 };
    struct kvm_segment data = code;
    data.selector = 0x10; data.type = 0x3;
    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.tr.base = 0; sregs.tr.limit = 0x67; sregs.tr.type = 0xb; sregs.tr.present = 1;
    sregs.tr.s = 0; sregs.tr.selector = 0;
    sregs.cr0 = 0x11; sregs.cr4 = 0; sregs.efer = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = strtoul(argv[2], NULL, 0), .rbx = 0x6000, .rflags = 2 };
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

    unsigned long exits = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        exits++;
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            uint8_t *p = (uint8_t *)run + run->io.data_offset;
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                if (run->io.port == 0x3f8) putchar(*p);
                else if (run->io.port == 0x64 && *p == 0xfe) { fflush(stdout); return 0; }
                else if (run->io.port == 0xf4) { fflush(stdout); return ((*(uint32_t *)p) << 1) | 1; }
            } else {
                memset(p, run->io.port == 0x3fd ? 0x60 : 0xff, run->io.size * run->io.count);
            }
            break;
        }
        case KVM_EXIT_MMIO:
            if (!run->mmio.is_write) memset(run->mmio.data, 0xff, 8);
            break;
        default:
            fprintf(stderr, "cloop: exit reason %u after %lu exits\n", run->exit_reason, exits);
            return 97;
        }
    }
}
