/* First CPL3 instructions: align the stack as the SysV ABI wants, enter C. */
    .text
    .code64
    .globl rt_user_entry
rt_user_entry:
    and $~0xf, %rsp
    call rt_main
1:  jmp 1b
    .section .note.GNU-stack, "", @progbits

/* CPL3 interrupt stubs for vectors 0x40-0x4f, 32 bytes apart: save the
 * caller-saved integer registers, call irq_dispatch(vector), iretq. Reached through
 * trap gates with DPL3 code selectors, so no privilege change and no stack switch
 * (the guests are built with -mno-red-zone for this). */
    .text
    .globl irq_stubs
    .align 32
irq_stubs:
    .set v, 0x40
    .rept 16
    .align 32
    push %rdi
    mov $v, %edi
    jmp irq_common
    .set v, v + 1
    .endr
irq_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %r8
    push %r9
    push %r10
    push %r11
    mov %rsp, %rax
    and $~0xf, %rsp
    push %rax
    push %rax
    call irq_dispatch
    pop %rax
    mov %rax, %rsp
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    pop %rdi
    iretq
    .section .note.GNU-stack, "", @progbits
