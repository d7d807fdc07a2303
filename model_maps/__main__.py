"""Print the support table (pasted into README.md between the SUPPORT markers)."""

from model_maps import support_table

print(support_table())
