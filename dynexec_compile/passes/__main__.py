from dynexec_compile.passes import describe_pass_order

print(describe_pass_order())
