import sys
import pandas as pd
import dask.dataframe as dd
from taskcore import Client

client = Client(sys.argv[1])
pdf = pd.DataFrame({"k": [i % 5 for i in range(1000)], "v": range(1000)})
df = dd.from_pandas(pdf, npartitions=8)
df = df.persist()
print(df.npartitions, len(df))
print(df.groupby("k").v.sum().compute().sort_index().tolist())
print(df[df.v > 990].v.compute().tolist())
print(int(client.compute(df.v.max()).result()))
client.close()

# expect: 8 1000
# expect: [99500, 99700, 99900, 100100, 100300]
# expect: [991, 992, 993, 994, 995, 996, 997, 998, 999]
# expect: 999
