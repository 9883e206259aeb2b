import sys
from taskcore import Client, WorkerPlugin, get_worker


class Tagger(WorkerPlugin):
    def __init__(self, tag):
        self.tag = tag

    def setup(self, worker):
        worker.tag = self.tag



def read_tag():
    return get_worker().tag


client = Client(sys.argv[1])
client.register_plugin(Tagger("blue"), name="tagger")
print(client.submit(read_tag, pure=False).result())
print(sorted(set(client.run(lambda dask_worker: dask_worker.tag).values())))
client.unregister_worker_plugin("tagger")
client.close()

# expect: blue
# expect: ['blue']
