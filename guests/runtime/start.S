/*
 * pyvmm tiny-guest runtime: entry, long mode, GDT/TSS/IDT, CPL0 stubs, drop to CPL3.
 *
 * Entries (all end in the same CPL3 C code):
 *   _start32     32-bit protected mode, paging off: PVH (ebx = hvm_start_info) and
 *                multiboot v1 (eax = 0x2BADB002, ebx = multiboot info).
 *   _flat_entry  the first byte of the image: 64-bit long mode at CPL0 with the
 *                VMM's identity page tables; rbx/rax as for _start32 (pyvmm's
 *                "direct 64-bit" start).
 *
 * Everything here runs at CPL0, which KVM-PVM executes through its instruction
 * emulator: integer instructions only (see shared/pvm-guest-notes.md §6), kept short.
 * All C code runs at CPL3, natively. CPL3 reaches CPL0 only through exceptions:
 * int3 is the port-I/O service (edi = op, edx = port, eax = value).
 */
#define MSR_EFER      0xC0000080
#define EFER_LME      0x100
#define CR0_PE        0x1
#define CR0_MP        0x2
#define CR0_EM        0x4
#define CR0_NE        0x20
#define CR0_WP        0x10000
#define CR0_PG        0x80000000
#define CR4_PAE       0x20
#define CR4_OSFXSR    0x200
#define CR4_OSXMMEXCPT 0x400
#define SEL_KCODE     0x08
#define SEL_KDATA     0x10
#define SEL_UDATA     0x1b
#define SEL_UCODE     0x23
#define SEL_TSS       0x28
#define COM1          0x3f8
#define DEBUG_EXIT    0xf4

    .section .text.start, "ax"
    .code64
    .globl _flat_entry
_flat_entry:
    jmp _start64

    /* Multiboot v1 header with the a.out kludge (flag 16): the loader needs no ELF32. */
    .align 4
multiboot_header:
    .long 0x1BADB002
    .long 0x00010002
    .long -(0x1BADB002 + 0x00010002)
    .long multiboot_header
    .long _image_start
    .long _edata
    .long _end
    .long _start32

    .code32
    .globl _start32
_start32:
    cli
    mov %eax, %esi                 /* keep magic and info pointer across the switch */
    mov %ebx, %edi
    lgdt gdt_ptr
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $pml4, %eax
    mov %eax, %cr3
    mov $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
    mov %eax, %cr4
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov $(CR0_PG | CR0_WP | CR0_NE | CR0_MP | CR0_PE), %eax
    mov %eax, %cr0
    mov %esi, %eax
    mov %edi, %ebx
    ljmp $SEL_KCODE, $_start64

    .code64
    .text
    .globl _start64
_start64:
    cli
    mov %eax, boot_magic(%rip)
    mov %rbx, boot_info(%rip)
    lea kstack_top(%rip), %rsp
    lgdt gdt_ptr(%rip)
    lea 1f(%rip), %rax
    pushq $SEL_KCODE
    push %rax
    lretq
1:  mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    lea pml4(%rip), %rax
    mov %rax, %cr3
    mov %cr0, %rax
    and $~CR0_EM, %rax
    or $(CR0_MP | CR0_NE | CR0_WP), %rax
    mov %rax, %cr0
    mov %cr4, %rax
    or $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %rax
    mov %rax, %cr4

    /* TSS descriptor (base split across the 16-byte descriptor), then ltr. */
    lea tss(%rip), %rax
    lea gdt(%rip), %rdi
    movw $0x67, 0x28(%rdi)
    movw %ax, 0x2a(%rdi)
    shr $16, %rax
    movb %al, 0x2c(%rdi)
    movb $0x89, 0x2d(%rdi)
    movb $0, 0x2e(%rdi)
    shr $8, %rax
    movb %al, 0x2f(%rdi)
    shr $8, %rax
    movl %eax, 0x30(%rdi)
    movl $0, 0x34(%rdi)
    lea kstack_top(%rip), %rax
    mov %rax, tss+4(%rip)
    movw $0x68, tss+0x66(%rip)
    mov $SEL_TSS, %eax
    ltr %ax

    /* IDT: vectors 0-31 to the exception reporter (16-byte stubs), 3 to the PIO
     * service with DPL 3 so CPL3 may raise it. Device vectors are set from C. */
    lea idt(%rip), %rdi
    lea exc_stubs(%rip), %rsi
    xor %ecx, %ecx
2:  mov $0x8E00, %edx               /* present, DPL0, 64-bit interrupt gate */
    cmp $3, %ecx
    jne 3f
    lea pio_stub(%rip), %rsi
    mov $0xEE00, %edx               /* DPL3: reachable by int3 from CPL3 */
3:  mov %rsi, %rax
    movw %ax, (%rdi)
    movw $SEL_KCODE, 2(%rdi)
    movw %dx, 4(%rdi)
    shr $16, %rax
    movw %ax, 6(%rdi)
    shr $16, %rax
    movl %eax, 8(%rdi)
    movl $0, 12(%rdi)
    cmp $3, %ecx
    jne 4f
    lea exc_stubs+64(%rip), %rsi    /* back on the stub table after vector 3 */
    jmp 5f
4:  add $16, %rsi
5:  add $16, %rdi
    inc %ecx
    cmp $32, %ecx
    jne 2b
    lidt idt_ptr(%rip)

    /* Mask both 8259s: firmware (SeaBIOS under QEMU) may have left the PIT's IRQ0
     * live at vector 8. Device tests unmask what they use. In pyvmm the in-kernel
     * PIC takes these writes without a userspace exit. */
    mov $0xff, %al
    outb %al, $0x21
    outb %al, $0xa1

    /* Drop to CPL3 with interrupts enabled. */
    pushq $SEL_UDATA
    lea ustack_top(%rip), %rax
    push %rax
    pushq $0x202
    pushq $SEL_UCODE
    lea rt_user_entry(%rip), %rax
    push %rax
    iretq

/* int3 from CPL3: port I/O at CPL0. edi = op, edx = port, eax = value / result. */
    .globl pio_stub
    .align 16
pio_stub:
    test %edi, %edi
    jne 1f
    outb %al, %dx
    iretq
1:  cmp $3, %edi
    jne 2f
    inb %dx, %al
    iretq
2:  cmp $2, %edi
    jne 3f
    outl %eax, %dx
    iretq
3:  cmp $5, %edi
    jne 4f
    inl %dx, %eax
    iretq
4:  cmp $1, %edi
    jne 5f
    outw %ax, %dx
    iretq
5:  inw %dx, %ax
    iretq

/* Exception stubs, 16 bytes each: push a dummy error code where the CPU does not. */
    .align 16
    .globl exc_stubs
exc_stubs:
    .set vec, 0
    .rept 32
    .align 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    pushq $vec
    .else
    pushq $0
    pushq $vec
    .endif
    jmp exc_common
    .set vec, vec + 1
    .endr

/* Report "!EXC vv eeeeeeee rrrrrrrrrrrrrrrr\n" on COM1 (vector, error, rip), then
 * exit through the test-exit port with 0x40 | vector. Integer-only asm. */
exc_common:
    mov $COM1, %edx
    mov $'!', %al
    outb %al, %dx
    mov (%rsp), %rbx
    mov $2, %ecx
    call put_hex
    mov 8(%rsp), %rbx
    mov $8, %ecx
    call put_hex
    mov 16(%rsp), %rbx
    mov $16, %ecx
    call put_hex
    mov $'\n', %al
    outb %al, %dx
    mov (%rsp), %eax
    and $0x1f, %eax
    or $0x40, %eax
    mov $DEBUG_EXIT, %edx
    outl %eax, %dx
6:  hlt
    jmp 6b

/* Print the low ecx nibbles of rbx as hex after a space, to port dx. */
put_hex:
    mov $' ', %al
    outb %al, %dx
    mov %ecx, %esi
    shl $2, %esi
    mov %esi, %ecx
7:  sub $4, %ecx
    mov %rbx, %rax
    shr %cl, %rax
    and $0xf, %eax
    cmp $10, %eax
    jb 8f
    add $('a' - 10 - '0'), %eax
8:  add $'0', %eax
    outb %al, %dx
    test %ecx, %ecx
    jne 7b
    ret

    .data
    .align 16
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF        /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
    .quad 0x00CFF2000000FFFF        /* 0x18 user data (DPL3) */
    .quad 0x00AFFA000000FFFF        /* 0x20 user code, 64-bit (DPL3) */
    .quad 0, 0                      /* 0x28 TSS, filled in at boot */
gdt_end:
    .align 8
    .word 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .align 8
    .word 0
idt_ptr:
    .word 256 * 16 - 1
    .quad idt

    .globl boot_magic, boot_info
    .align 8
boot_info:  .quad 0
boot_magic: .long 0

/* Identity map of the low 4 GiB with 2 MiB pages, U bit set throughout: CPL3 code
 * reaches RAM, MMIO windows and the LAPIC directly. */
    .align 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
    .set page, 0
    .rept 2048
    .quad (page << 21) | 0x87
    .set page, page + 1
    .endr

    .bss
    .align 4096
    .globl idt
idt:    .skip 4096
tss:    .skip 0x68
    .align 16
kstack: .skip 16384
kstack_top:
    .align 16
ustack: .skip 65536
ustack_top:

/* PVH entry point for loaders that read ELF notes (pyvmm, QEMU -kernel). */
    .section .note.Xen, "a", @note
    .align 4
    .long 4                         /* namesz */
    .long 4                         /* descsz */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start32
    .align 4

    .section .note.GNU-stack, "", @progbits
