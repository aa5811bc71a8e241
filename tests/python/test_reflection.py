"""gRPC reflection as the tools that still speak only `grpc.reflection.v1alpha` use it
(grpcio's Python client, Postman, grpcui, older grpcurl): grpcio's own reflection
client lists batchd's services and resolves the contract's descriptors."""

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def test_grpcio_lists_and_resolves_the_services_over_v1alpha(batchd):
    with grpc.insecure_channel(batchd.grpc_target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "batchd.v1.BatchService",
            "batchd.v1.BatchWorkerService",
            "batchd.v1.WebhookService",
            "grpc.health.v1.Health",
        } <= services, services
        pool = DescriptorPool(database)
        service = pool.FindServiceByName("batchd.v1.BatchService")
        methods = {method.name for method in service.methods}
        assert {"CreateBatch", "GetBatch", "ListBatches", "CancelBatch", "WatchBatch"} <= methods
        webhooks = pool.FindServiceByName("batchd.v1.WebhookService")
        assert "CreateWebhookEndpoint" in {method.name for method in webhooks.methods}
        update = pool.FindMethodByName("batchd.v1.BatchWorkerService.UpdateBatch")
        assert update.input_type.full_name == "batchd.v1.UpdateBatchRequest"
